"""Scan throughput over WebDataset tars (issue 23): the scan stage of a run (validate, tag, uid hashes,
sidecars) against a bare ``tarfile`` pass over the same shards that reads every member, and the
source reader alone (with and without the image bytes).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_webdataset_scan.py    # 8 tars x 4000 samples, 16 KiB images

Tars are generated like img2dataset's output (``<key>.jpg``, ``.txt``, ``.json`` with key, status,
caption, width, height) into a temporary directory and read from the page cache (one warm-up pass).
Each figure is the best of ``--repeats``. Writes benchmarks/results/webdataset_scan.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.io.source import TAR_KEY, read_source  # noqa: E402
from mmbalance.pipeline.rebalance import RunOptions, rebalance  # noqa: E402
from mmbalance.schemas.recipe import parse_recipe  # noqa: E402

WORDS = ["a", "woman", "man", "welder", "nurse", "at", "work", "photo", "of", "the", "city", "dog", "with"]


def write_tars(directory: Path, shards: int, samples: int, image_bytes: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(samples):
                key = f"{s:05d}{i:04d}"
                caption = " ".join(rng.choice(WORDS, size=12))
                meta = {"key": key, "status": "success", "caption": caption, "error_message": None,
                        "width": 256, "height": 256, "url": f"http://example.com/{key}.jpg",
                        "gender": ["woman", "man", None][i % 3], "occupation": WORDS[3 + i % 2]}
                members = {"jpg": b"\xff\xd8\xff" + rng.bytes(image_bytes - 3), "txt": caption.encode(),
                           "json": json.dumps(meta).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                total += 1
    return total


def bare_tarfile_pass(paths: list[Path]) -> int:
    """What any tar consumer does at least: every member's header and bytes."""
    samples = 0
    for path in paths:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if member.isreg():
                    data = tar.extractfile(member).read()
                    samples += member.name.endswith(".json") and len(data) > 0
    return samples


def reader_pass(paths: list[Path], columns: list[str], batch_rows: int) -> int:
    fs = pafs.LocalFileSystem()
    rows = 0
    for path in paths:
        for table in read_source(fs, str(path), path.name, columns, batch_rows, "webdataset"):
            rows += table.num_rows
    return rows


def best(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds of this process, the result): CPU time is the steadier
    figure on a loaded machine."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4000, help="samples per tar")
    parser.add_argument("--image-bytes", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "webdataset_scan.json"))
    args = parser.parse_args()
    out: dict = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_webdataset_scan.py "
                            + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                 "shards": args.shards, "samples_per_shard": args.samples, "image_bytes": args.image_bytes,
                 "repeats": args.repeats, "loadavg_before": os.getloadavg()}
    # the scan of a tagged corpus: tags from json fields (reading-bound), and from caption vocabularies
    # (tagging-bound: the lexicons cost the same per row whatever the format)
    recipes = {
        "column_tags": parse_recipe({
            "input": {"columns": {"caption": "txt"}},  # uid: the key, status: the json's (tar defaults)
            "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
            "labels": [{"name": "occupation", "source": "column", "column": "occupation"}],
            "report": {"leakage": False, "html": False}}),
        "caption_tags": parse_recipe({
            "input": {"columns": {"caption": "txt"}},
            "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"}}],
            "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
            "report": {"leakage": False, "html": False}}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "wds"
        corpus.mkdir()
        rows = write_tars(corpus, args.shards, args.samples, args.image_bytes)
        paths = sorted(corpus.glob("*.tar"))
        out["rows"], out["bytes"] = rows, sum(p.stat().st_size for p in paths)
        bare_tarfile_pass(paths)  # warm the page cache
        wall, cpu = {}, {}
        wall["bare_tarfile_pass"], cpu["bare_tarfile_pass"], n = best(lambda: bare_tarfile_pass(paths), args.repeats)
        assert n == rows
        scan_columns = [TAR_KEY, "txt", "status", "gender", "occupation"]
        wall["reader_scan_columns"], cpu["reader_scan_columns"], n = best(
            lambda: reader_pass(paths, scan_columns, 4096), args.repeats)
        assert n == rows
        wall["reader_with_image_bytes"], cpu["reader_with_image_bytes"], n = best(
            lambda: reader_pass(paths, [*scan_columns, "jpg"], 4096), args.repeats)
        assert n == rows
        for name, recipe in recipes.items():
            stage_walls: list[float] = []

            def scan(recipe=recipe, stage_walls=stage_walls) -> None:
                run = Path(tempfile.mkdtemp(dir=tmp))
                result = rebalance(str(corpus), str(run / "o"), recipe,
                                   RunOptions(executor="local", stop_after="dedup", show_progress=False))
                assert sum(s["rows_in"] for s in result.report["scans"]) == rows
                stage_walls.append(result.stage_seconds["scan"])

            # wall: the scan stage alone; CPU: the whole validation run (discovery, scan, dedup): an upper bound
            _, cpu[f"validate_run_{name}"], _ = best(scan, args.repeats)
            wall[f"scan_stage_{name}"] = min(stage_walls)
    out["wall_seconds"] = {k: round(v, 4) for k, v in wall.items()}
    out["cpu_seconds"] = {k: round(v, 4) for k, v in cpu.items()}
    out["rows_per_s"] = {k: round(rows / v) for k, v in wall.items()}
    # the bar: the scan at >= 0.8 of a bare tarfile pass (wall, on a quiet machine)
    out["scan_stage_vs_bare_tarfile"] = {name: round(wall["bare_tarfile_pass"] / wall[f"scan_stage_{name}"], 3)
                                         for name in recipes}
    out["reader_vs_bare_tarfile"] = round(wall["bare_tarfile_pass"] / wall["reader_scan_columns"], 3)
    out["reader_with_images_vs_bare_tarfile"] = round(wall["bare_tarfile_pass"] / wall["reader_with_image_bytes"], 3)
    out["cpu_validate_run_vs_bare_tarfile"] = {name: round(cpu["bare_tarfile_pass"] / cpu[f"validate_run_{name}"], 3)
                                               for name in recipes}
    write_result(out, args.out)


def write_result(out: dict, path: str) -> None:
    """The figures with the load after the run and the machine, as JSON to ``path`` and stdout."""
    out["loadavg_after"] = os.getloadavg()
    out["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "pyarrow": pa.__version__}
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
