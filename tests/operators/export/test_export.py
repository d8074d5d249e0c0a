"""Exports from a run's manifest: round trips, the open_clip mixture, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbalance.operators.export import export_run, safe_dir_names, sample_key, sniff_image
from mmbalance.operators.export.datacomp import UID_DTYPE, uid_array, uid_pair
from mmbalance.operators.export.webdataset import realised_shares, upsampling_factors
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.export import ExportOptions
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE, synth_corpus

FORMATS = ["parquet", "csv", "webdataset", "wids", "bigvision", "hf", "datacomp"]
HEAVY = "nurse"  # the domain the test manifest repeats 4 times


def _repeats_for(occupation: str | None, r: float) -> int:
    if r < 0.2:
        return 0  # some rows dropped
    return 4 if occupation == HEAVY else 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small run whose manifest is rewritten with known repeats: nurse x4, others x1, 20% dropped."""
    base = tmp_path_factory.mktemp("export")
    synth_corpus(base / "corpus", 500, 2, seed=3, dim=8)
    recipe = parse_recipe({**DEMO_RECIPE, "input": {**DEMO_RECIPE["input"], "columns": {**DEMO_RECIPE["input"]["columns"], "image": "image"}}})
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    rng = np.random.default_rng(0)
    for path in sorted((base / "run" / "manifest").glob("*.parquet")):
        m = pq.read_table(path)
        tags = pq.read_table(base / "run" / "tags" / path.name).to_pydict()
        occ = dict(zip(tags["row"], tags["tag.occupation"]))
        reps = [_repeats_for(occ[r], u) for r, u in zip(m["row"].to_pylist(), rng.random(m.num_rows))]
        m = m.set_column(m.schema.get_field_index("repeats"), "repeats", pa.array(reps, pa.int32()))
        m = m.set_column(m.schema.get_field_index("weight"), "weight", pa.array([float(r) for r in reps], pa.float64()))
        pq.write_table(m, path)
    return base / "run"


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> dict:
    return export_run(str(run_dir), FORMATS, ExportOptions(domain={"by": "occupation"}, webdataset={"shard_size": 7}))


def _source(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((run_dir.parent / "corpus").glob("*.parquet")):
        t = pq.read_table(path, columns=["uid", "caption", "image", "occupation"]).to_pydict()
        for uid, cap, img, occ in zip(t["uid"], t["caption"], t["image"], t["occupation"]):
            out[uid] = {"caption": cap, "image": img, "occupation": occ}
    return out


def _kept(run_dir: Path) -> dict[str, int]:
    out = {}
    for path in sorted((run_dir / "manifest").glob("*.parquet")):
        m = pq.read_table(path).to_pydict()
        out.update({u: r for u, r in zip(m["uid"], m["repeats"]) if r > 0})
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_repeats_rows_and_keeps_captions_and_images(run_dir, exported):
    src, kept = _source(run_dir), _kept(run_dir)
    with open(exported["csv"]["file"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["uid"]] = seen.get(row["uid"], 0) + 1
        assert row["title"] == src[row["uid"]]["caption"]
        assert Path(row["filepath"]).read_bytes() == src[row["uid"]]["image"]
        assert row["domain"] == src[row["uid"]]["occupation"]
    assert seen == kept  # every kept uid exactly `repeats` times, nothing else
    assert len(rows) == sum(kept.values()) == exported["csv"]["rows"]


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    width = len(m.group(1))
    return [pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end():] for i in range(int(m.group(1)), int(m.group(2)) + 1)]


def _tar_samples(path: str) -> list[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [{"key": k, **v} for k, v in samples.items()]


def test_webdataset_tars_hold_every_kept_sample(run_dir, exported):
    src, kept = _source(run_dir), _kept(run_dir)
    args = exported["webdataset"]["open_clip_args"]
    urls = [u for part in args[args.index("--train-data") + 1].split("::") for u in _expand(part)]
    found = {}
    for url in urls:
        sizes = json.loads((Path(url).parent / "sizes.json").read_text())
        samples = _tar_samples(url)
        assert sizes[Path(url).name] == len(samples)
        for s in samples:
            assert "." not in s["key"]
            meta = json.loads(s["json"])
            assert s["png"] == src[meta["uid"]]["image"]
            assert s["txt"] == src[meta["uid"]]["caption"].encode("utf-8")  # byte-identical caption
            assert meta["domain"] == src[meta["uid"]]["occupation"] == Path(url).parent.name
            found[meta["uid"]] = meta["repeats"]
    assert found == kept  # every kept uid reachable, once
    wids = json.loads((Path(exported["webdataset"]["dir"]) / "wids.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1"
    assert sorted(str(Path(exported["webdataset"]["dir"]) / s["url"]) for s in wids["shardlist"]) == sorted(urls)


def test_resampled_draws_match_the_target_shares(run_dir, exported):
    """Simulate open_clip --dataset-resampled: a shard drawn with its source's factor, all its samples read."""
    info = exported["webdataset"]
    args = info["open_clip_args"]
    parts = args[args.index("--train-data") + 1].split("::")
    factors = [float(f) for f in args[args.index("--train-data-upsampling-factors") + 1].split("::")]
    assert len(parts) == len(factors)
    urls, weights = [], []
    for part, f in zip(parts, factors):
        for u in _expand(part):
            urls.append(u)
            weights.append(f)
    domains = [Path(u).parent.name for u in urls]
    sizes = [len(_tar_samples(u)) for u in urls]
    names = sorted(set(domains))
    target = {d: info["domains"][d]["target_share"] for d in names}
    # the test manifest: nurse rows repeat 4x, so nurse's target share is ~4x its share of samples
    samples_share = {d: info["domains"][d]["samples"] / sum(v["samples"] for v in info["domains"].values()) for d in names}
    assert target[HEAVY] > 3 * samples_share[HEAVY]

    def draw(ws: list[float], n: int) -> dict[str, float]:
        rng = random.Random(0)
        counts = dict.fromkeys(names, 0)
        for i in rng.choices(range(len(urls)), weights=ws, k=n):
            counts[domains[i]] += sizes[i]
        total = sum(counts.values())
        return {d: c / total for d, c in counts.items()}

    n = 40_000
    p = np.array(weights) / sum(weights)
    x = np.array(sizes, float)
    mean = float(p @ x)

    def sd(d: str) -> float:  # ratio-estimator standard error of domain d's share over n shard draws
        xd = np.where(np.array(domains) == d, x, 0.0)
        return math.sqrt(float(p @ (xd - target[d] * x) ** 2) / n) / mean

    shares = draw(weights, n)
    for d in names:
        assert abs(shares[d] - target[d]) < 5 * sd(d) + 1e-3, d
    # without the factors the heavy domain is far off: the check can fail
    plain = draw([1.0] * len(urls), n)
    assert abs(plain[HEAVY] - target[HEAVY]) > 10 * sd(HEAVY)


def test_factor_rule():
    f = upsampling_factors([0.5, 0.3, 0.2], [100, 10, 50])
    assert max(f) == 1.0
    assert realised_shares(f, [100, 10, 50]) == pytest.approx([0.5, 0.3, 0.2])


def test_datacomp_array_round_trips_sorted(run_dir, exported):
    arr = np.load(exported["datacomp"]["file"], allow_pickle=False)
    assert arr.dtype == UID_DTYPE and arr.ndim == 1
    pairs = arr.tolist()
    assert all(a < b for a, b in zip(pairs, pairs[1:]))  # sorted and unique
    kept = _kept(run_dir)
    assert set(arr.tolist()) == {uid_pair(u)[:2] for u in kept}
    mapping = pq.read_table(exported["datacomp"]["uid_map"]).to_pydict()
    assert set(mapping["uid"]) == set(kept)  # synth uids are not 128-bit hex: all mapped, all listed
    hexes = [f"{random.Random(i).getrandbits(128):032x}" for i in range(50)]
    back = [f"{a:016x}{b:016x}" for a, b in uid_array(hexes).tolist()]
    assert back == sorted(hexes)  # hex uids map exactly (DataComp's convention)


def test_bigvision_and_hf_carry_the_mixture(run_dir, exported):
    kept = _kept(run_dir)
    bv = exported["bigvision"]
    assert sum(bv["data"].values()) == pytest.approx(1.0)
    lines = [json.loads(line) for p in Path(bv["dir"]).glob("*.jsonl") for line in p.read_text().splitlines()]
    assert sorted(x["uid"] for x in lines) == sorted(kept)
    assert all((Path(bv["dir"]) / "images" / x["image"]).is_file() for x in lines)
    snippet = Path(bv["snippet"]).read_text()
    assert "config.input.data = {" in snippet and "bv:jsonl" in snippet
    hf = exported["hf"]
    assert sum(hf["probabilities"]) == pytest.approx(1.0)
    assert hf["probabilities"][hf["domains"].index(HEAVY)] == pytest.approx(exported["mixture"]["domains"][HEAVY]["target_share"] / sum(
        exported["mixture"]["domains"][d]["target_share"] for d in hf["domains"]))
    uids = []
    for d in hf["data_dirs"]:
        meta = pq.read_table(Path(d) / "metadata.parquet").to_pydict()
        assert all((Path(d) / f).is_file() for f in meta["file_name"])
        uids += meta["uid"]
    assert sorted(uids) == sorted(kept)


def test_mixture_json(run_dir, exported):
    mix = json.loads((run_dir / "export" / "mixture.json").read_text())
    kept = _kept(run_dir)
    assert mix["epoch_size"] == sum(kept.values())
    assert sum(d["target_share"] for d in mix["domains"].values()) == pytest.approx(1.0)
    assert sum(d["kept"] for d in mix["domains"].values()) == len(kept)


def test_reexport_is_byte_identical_and_leaves_no_stale_files(run_dir, exported):
    root = run_dir / "export"
    before = _tree_digest(root)
    export_run(str(run_dir), FORMATS, ExportOptions(domain={"by": "occupation"}, webdataset={"shard_size": 3}))
    assert _tree_digest(root) != before
    export_run(str(run_dir), FORMATS, ExportOptions(domain={"by": "occupation"}, webdataset={"shard_size": 7}))
    assert _tree_digest(root) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_cluster_column_domains(run_dir, tmp_path):
    for path in sorted((run_dir / "tags").glob("*.parquet")):
        rows = pq.read_table(path, columns=["row"])["row"].to_numpy()
        (run_dir / "clusters").mkdir(exist_ok=True)
        pq.write_table(pa.table({"row": rows, "cluster_id": (rows % 3).astype(np.int32)}), run_dir / "clusters" / path.name)
    opts = ExportOptions(dest=str(tmp_path / "out"), domain={"column": "cluster_id", "source": "clusters"})
    result = export_run(str(run_dir), ["webdataset"], opts)
    assert sorted(result["webdataset"]["domains"]) == ["0", "1", "2"]
    assert sum(v["samples"] for v in result["webdataset"]["domains"].values()) == len(_kept(run_dir))


def test_streaming_is_skipped_with_a_message_when_missing(run_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("streaming") is not None:
        pytest.skip("mosaicml-streaming installed")
    result = export_run(str(run_dir), ["streaming", "datacomp"], ExportOptions(dest=str(tmp_path / "o")))
    assert "mosaicml-streaming" in result["streaming"]["skipped"]
    assert (tmp_path / "o" / "datacomp" / "uids.npy").is_file()
    assert not (tmp_path / "o" / "streaming").exists()


def test_keys_names_and_sniffing():
    tricky = ["a.b", "a/b", "a b", "x" * 100, "ok-1_2", "a.b "]
    keys = [sample_key(u) for u in tricky]
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert len(set(keys)) == len(keys) and sample_key("ok-1_2") == "ok-1_2"
    dirs = safe_dir_names(["a/b", "a_b", "A_B", "::", ""])
    assert len({d.lower() for d in dirs}) == 5 and all(re.fullmatch(r"[A-Za-z0-9_-]+", d) for d in dirs)
    assert sniff_image(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff_image(b"\xff\xd8\xff\xe0") == "jpg"
    assert sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "webp"
    assert sniff_image(b"GIF89a") is None


def test_missing_run_is_a_clear_error(tmp_path):
    from mmbalance.schemas.contract import InputError

    with pytest.raises(InputError, match="not an mmbalance run"):
        export_run(str(tmp_path), ["csv"])
    with pytest.raises(InputError, match="unknown export format"):
        from mmbalance.operators.export import _format_dirs

        _format_dirs(["tarball"])
