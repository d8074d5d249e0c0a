"""The MosaicML and Hugging Face exports read by the real libraries, in their own environment.

mosaicml-streaming pins numpy < 2.2, so these libraries live in ``.venv-consumers`` (made by
``scripts/setup_consumers.sh``, which ``scripts/setup.sh`` runs); the readers in ``consumers/`` run
there as subprocesses. Without that environment the tests are skipped on a developer machine and
fail under CI (``CI`` set), where setup always makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmbalance.operators.export import export_run
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.export import ExportOptions
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE, synth_corpus

ROOT = Path(__file__).resolve().parents[3]
PYTHON = Path(os.environ.get("MMBALANCE_CONSUMERS_VENV", ROOT / ".venv-consumers")) / "bin" / "python"
READERS = Path(__file__).parent / "consumers"

if not PYTHON.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{PYTHON} is missing: CI must run scripts/setup.sh (which runs scripts/setup_consumers.sh)", pytrace=False)
    pytest.skip(f"{PYTHON} is missing: run scripts/setup_consumers.sh for the MosaicML and HF round trips", allow_module_level=True)


def _consume(reader: str, *args: str, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(PYTHON), str(READERS / reader), *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run whose weights come from Kamiran-Calders reweighing: repeats 0 to 3 inside every domain."""
    base = tmp_path_factory.mktemp("consumers")
    synth_corpus(base / "corpus", 300, 2, seed=7, dim=8)
    columns = {**DEMO_RECIPE["input"]["columns"], "image": "image"}
    recipe = parse_recipe({**DEMO_RECIPE, "input": {"columns": columns}, "clusters": [],
                           "balance": {"method": "reweigh", "attribute": "gender", "label": "occupation"}})
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    return base / "run"


def _manifest(run: Path) -> tuple[dict[str, int], dict[str, tuple[str, str]]]:
    """uid -> repeats (kept rows), uid -> (caption, sha256 of the image bytes) from the corpus."""
    kept = {}
    for path in sorted((run / "manifest").glob("*.parquet")):
        m = pq.read_table(path).to_pydict()
        kept.update({u: r for u, r in zip(m["uid"], m["repeats"]) if r > 0})
    src = {}
    for path in sorted((run.parent / "corpus").glob("*.parquet")):
        t = pq.read_table(path, columns=["uid", "caption", "image"]).to_pydict()
        src.update({u: (c, hashlib.sha256(i).hexdigest()) for u, c, i in zip(t["uid"], t["caption"], t["image"])})
    return kept, src


@pytest.fixture(scope="module")
def streaming(run, tmp_path_factory) -> tuple[dict, dict, dict, dict]:
    """Both streaming exports (copies: repeats and once) and one StreamingDataset epoch of each,
    read in a single consumer process."""
    tmp = tmp_path_factory.mktemp("streaming")
    # small shards: several per stream, so the reader walks shard boundaries and offsets
    repeats = export_run(str(run), ["streaming"], ExportOptions(dest=str(tmp / "repeats"), domain={"by": "occupation"},
                                                                streaming={"size_limit": 1 << 13}))
    once = export_run(str(run), ["streaming"], ExportOptions(dest=str(tmp / "once"), copies="once", domain={"by": "occupation"}))
    got = _consume("read_streaming.py", "0", str(tmp / "repeats" / "streaming" / "streams.json"),
                   str(tmp / "once" / "streaming" / "streams.json"), tmp=tmp)
    return repeats, got[0], once, got[1]


def test_streaming_dataset_epoch_draws_every_uid_repeats_times(run, streaming):
    kept, src = _manifest(run)
    assert len(set(kept.values())) > 1  # the weights differ between rows: the round trip can fail
    result, got, _, _ = streaming
    assert all("repeat" in s for s in result["streaming"]["streams"])
    indexes = [json.loads((Path(s["local"]) / "index.json").read_text()) for s in result["streaming"]["streams"]]
    assert max(len(i["shards"]) for i in indexes) > 2
    assert got["uids"] == kept  # one StreamingDataset epoch is the manifest, exactly
    assert got["epoch_size"] == sum(kept.values())
    for uid, (caption, image, repeats) in got["fields"].items():
        assert (caption, image) == src[uid] and repeats == kept[uid]
    assert got["domains"] == result["streaming"]["epoch_samples"]


def test_streaming_proportions_with_copies_once(run, streaming):
    """copies: once: one stream per domain with its target share; StreamingDataset takes
    round(proportion x epoch) samples of each stream, so the domain counts are exact to rounding."""
    kept, _ = _manifest(run)
    _, _, result, got = streaming
    streams = result["streaming"]["streams"]
    assert all("proportion" in s for s in streams)
    n = got["epoch_size"]
    assert abs(n - len(kept)) <= len(streams)
    by_dir = {v["dir"]: name for name, v in result["mixture"]["domains"].items()}
    proportion = {by_dir[Path(s["local"]).name]: s["proportion"] for s in streams}
    mix = result["mixture"]["domains"]
    for domain, p in proportion.items():
        assert p == pytest.approx(mix[domain]["target_share"] / sum(mix[d]["target_share"] for d in proportion))
        assert abs(got["domains"].get(domain, 0) - p * n) <= 1, domain
    assert sum(got["domains"].values()) == n and set(got["uids"]) <= set(kept)


def test_hf_loader_epoch_and_interleave(run, tmp_path):
    """hf/load_mixture.py as written, in datasets: epoch() holds every uid exactly `repeats` times;
    interleaved() draws domains with the repeat shares. Pearson chi-square over domains on the first
    draws; a correct export fails it with probability 1e-6 (and it is seeded, so it cannot flake)."""
    from scipy.stats import chi2

    kept, src = _manifest(run)
    result = export_run(str(run), ["hf"], ExportOptions(dest=str(tmp_path / "out"), domain={"by": "occupation"}))
    draws = sum(kept.values())
    got = _consume("read_hf.py", str(tmp_path / "out" / "hf" / "load_mixture.py"), str(draws), tmp=tmp_path)
    assert got["uids"] == kept
    for uid, (caption, size, repeats) in got["fields"].items():
        assert caption == src[uid][0] and min(size) > 0 and repeats == kept[uid]
    hf = result["hf"]
    probs = dict(zip(hf["domains"], hf["probabilities"]))
    n = sum(got["domains"].values())
    counts = np.array([got["domains"].get(d, 0) for d in probs], float)
    expected = np.array([p * n for p in probs.values()])
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert stat < chi2.ppf(1 - 1e-6, len(probs) - 1)
