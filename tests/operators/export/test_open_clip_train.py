"""Acceptance: open_clip trains for a few CPU steps on the exported TSV and on the exported
webdataset with upsampling factors, with no glue. Needs the ``embed`` extra (torch, open_clip)
and open_clip_train's data dependencies (webdataset, braceexpand); skipped where they are absent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

for _mod in ("torch", "open_clip", "open_clip_train", "webdataset", "braceexpand", "pandas"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed (embed extra + webdataset, braceexpand)", allow_module_level=True)

from mmbalance.operators.export import export_run  # noqa: E402
from mmbalance.pipeline.rebalance import RunOptions, rebalance  # noqa: E402
from mmbalance.schemas.export import ExportOptions  # noqa: E402
from mmbalance.schemas.recipe import parse_recipe  # noqa: E402
from mmbalance.synth import DEMO_RECIPE, synth_corpus  # noqa: E402

TINY = {  # 2-layer, 64-wide towers: ~3M parameters, trains at ~0.05 s/step on one core
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("oc")
    synth_corpus(base / "corpus", 160, 2, seed=5, dim=8)
    columns = {**DEMO_RECIPE["input"]["columns"], "image": "image"}
    recipe = parse_recipe({**DEMO_RECIPE, "input": {"columns": columns}, "balance": {"method": "cap", "by": "occupation", "cap": 12}})
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    opts = ExportOptions(domain={"by": "occupation"}, epoch_size=48, webdataset={"shard_size": 8})
    result = export_run(str(base / "run"), ["csv", "webdataset"], opts)
    model = base / "tiny-clip"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps(TINY))
    return base, result, model


def _train(base: Path, model: Path, data_args: list[str]) -> Path:
    name = f"t-{uuid.uuid4().hex[:8]}"  # open_clip exits 0 without training if the run dir exists
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model}", *data_args,
           "--batch-size", "8", "--epochs", "1", "--warmup", "1", "--lr", "1e-3", "--workers", "0",
           "--device", "cpu", "--precision", "fp32", "--logs", str(base / "logs"), "--name", name,
           "--log-every-n-steps", "1", "--report-to", "", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "logs" / name


def test_open_clip_trains_on_the_exported_tsv(exported):
    base, result, model = exported
    run = _train(base, model, result["csv"]["open_clip_args"])
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    assert "Contrastive_loss" in (run / "out.log").read_text()


def test_open_clip_trains_on_the_exported_webdataset_with_factors(exported):
    base, result, model = exported
    args = result["webdataset"]["open_clip_args"]
    assert "--train-data-upsampling-factors" in args and "--dataset-resampled" in args
    run = _train(base, model, args)
    assert (run / "checkpoints" / "epoch_1.pt").is_file()
    assert "Contrastive_loss" in (run / "out.log").read_text()
