"""Exports to an S3-compatible store against the same exports to the local disk (issue 23): moto's S3
server on loopback, a synth corpus with PNG images, ``csv`` (one image file per kept row) and
``webdataset`` (tars sized by the share-deviation rule), each timed locally and to ``s3://``; the
bar is export-to-store <= 1.5 x local + bytes / upload bandwidth, the bandwidth measured by uploading
the same number of bytes as one object. Requests per uploaded file are counted from the server log.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export_s3.py     # 10,713 rows, as in the issue

Writes benchmarks/results/export_s3.json.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_webdataset_scan import write_result  # noqa: E402
from object_store import CREDENTIALS, make_bucket, start_moto  # noqa: E402

from mmbalance.operators.export import export_run  # noqa: E402
from mmbalance.pipeline.rebalance import RunOptions, rebalance  # noqa: E402
from mmbalance.schemas.export import ExportOptions  # noqa: E402
from mmbalance.schemas.recipe import parse_recipe  # noqa: E402
from mmbalance.synth import synth_corpus  # noqa: E402


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def bare_upload(fs: pafs.FileSystem, root: Path, prefix: str, threads: int = 32) -> float:
    """The same files uploaded by a bare thread pool (one PUT each): what the store itself allows."""
    files = [p for p in root.rglob("*") if p.is_file()]

    def put(path: Path) -> None:
        with fs.open_output_stream(f"{prefix}/{path.relative_to(root)}") as f:
            f.write(path.read_bytes())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_713)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export_s3.json"))
    args = parser.parse_args()
    out: dict = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export_s3.py "
                            + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                 "rows": args.rows, "loadavg_before": os.getloadavg(), "formats": {}}
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = start_moto(tmp_path)
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        try:
            synth_corpus(tmp_path / "c", rows=args.rows, shards=args.shards, seed=0, dim=8, images=True)
            recipe = parse_recipe({"input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
                                   "labels": [{"name": "occupation"}], "report": {"html": False, "leakage": False}})
            rebalance(str(tmp_path / "c"), str(tmp_path / "run"), recipe, RunOptions(executor="local", show_progress=False))
            make_bucket(server, "bench")
            fs = pafs.S3FileSystem(endpoint_override=server.endpoint.split("://")[1], scheme="http", region="us-east-1",
                                   allow_delayed_open=True)
            for fmt in ("csv", "webdataset"):
                options = {"domain": {"by": "occupation"}}
                t0 = time.perf_counter()
                export_run(str(tmp_path / "run"), [fmt], ExportOptions.model_validate({**options, "dest": str(tmp_path / f"local-{fmt}")}))
                local = time.perf_counter() - t0
                files, size = tree_bytes(tmp_path / f"local-{fmt}" / ("csv" if fmt == "csv" else "webdataset"))
                first = server.log_lines()
                t0 = time.perf_counter()
                export_run(str(tmp_path / "run"), [fmt], ExportOptions.model_validate({**options, "dest": f"s3://bench/{fmt}"}))
                remote = time.perf_counter() - t0
                time.sleep(0.5)
                requests = server.requests(first)
                blob = os.urandom(size)
                t0 = time.perf_counter()
                with fs.open_output_stream(f"bench/bandwidth-{fmt}") as f:
                    f.write(blob)
                upload = time.perf_counter() - t0
                same_files = bare_upload(fs, tmp_path / f"local-{fmt}", f"bench/bare-{fmt}")
                bar = 1.5 * local + upload
                out["formats"][fmt] = {
                    "files": files, "bytes": size, "local_s": round(local, 3), "s3_s": round(remote, 3),
                    "one_object_upload_s": round(upload, 3), "bandwidth_MB_s": round(size / upload / 1e6, 1),
                    "bar_s": round(bar, 3), "within_bar": remote <= bar, "s3_over_bar": round(remote / bar, 3),
                    # per-request cost, not bandwidth, bounds many small files: the same files by a bare pool
                    "same_files_bare_upload_s": round(same_files, 3),
                    "same_files_bar_s": round(1.5 * local + same_files, 3),
                    "within_same_files_bar": remote <= 1.5 * local + same_files,
                    "requests": len(requests), "puts": sum(r.startswith("PUT ") for r in requests),
                    "multipart_initiations": sum("?uploads" in r for r in requests),
                }
        finally:
            server.process.terminate()
            server.process.wait(timeout=30)
    write_result(out, args.out)


if __name__ == "__main__":
    main()
