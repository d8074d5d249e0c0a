"""Acceptance: ``mmbalance evaluate`` reads a checkpoint written by open_clip_train, unmodified.

open_clip_train runs a few CPU steps on a tiny ``local-dir:`` model over a generated CSV of the
evaluation images and captions; its ``epoch_1.pt`` (state_dict, optimizer, epoch, name) goes to the
command line as ``model.checkpoint``. The embeddings the evaluation used must be those of the
trained weights, loaded here by hand from the same file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpora import TINY_OPEN_CLIP
from evaluate_sets import eval_table, model_dir, write_eval_set
from typer.testing import CliRunner

for _mod in ("torch", "open_clip", "open_clip_train", "pandas"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed (embed extra)", allow_module_level=True)

from mmbalance.cli import app  # noqa: E402


def test_evaluate_reads_an_open_clip_train_checkpoint(tmp_path):
    import open_clip
    import torch

    model = model_dir(tmp_path / "tiny", TINY_OPEN_CLIP)
    table = eval_table(48, seed=7)
    images = tmp_path / "images"
    images.mkdir()
    lines = ["filepath\ttitle"]
    for uid, data, caption in zip(table["uid"].to_pylist(), table["image"].to_pylist(), table["caption"].to_pylist()):
        (images / f"{uid}.png").write_bytes(data)
        lines.append(f"{images / uid}.png\t{caption}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    name = f"t-{uuid.uuid4().hex[:8]}"  # open_clip_train exits 0 without training if the run dir exists
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model}", "--dataset-type", "csv",
           "--train-data", str(tmp_path / "train.csv"), "--csv-img-key", "filepath", "--csv-caption-key", "title",
           "--batch-size", "8", "--epochs", "1", "--warmup", "1", "--lr", "1e-3", "--workers", "0", "--device", "cpu",
           "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--name", name, "--report-to", "", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "logs" / name / "checkpoints" / "epoch_1.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(saved)  # as open_clip_train writes it

    path, recipe = write_eval_set(tmp_path / "set", rows=48, seed=7, model_dir=model, weights=f"checkpoint: {ckpt}", samples=10)
    result = CliRunner().invoke(app, ["evaluate", str(path), "--recipe", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "evaluate.json").read_text())
    assert doc["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert doc["model"]["pretrained_kind"] == "file" and doc["eval"]["images"] == 48

    # the trained weights, loaded by hand, give the embeddings the evaluation used
    trained = open_clip.create_model(f"local-dir:{model}", pretrained=None)
    trained.load_state_dict({k.removeprefix("module."): v for k, v in saved["state_dict"].items()})
    trained.eval()
    emb = pq.read_table(next((tmp_path / "out" / "embeddings").glob("*.parquet"))).sort_by("row")
    used = np.array(emb.column("image_emb").to_pylist(), np.float64)
    from PIL import Image
    import io

    pre = open_clip.image_transform(trained.visual.image_size, is_train=False)
    pixels = torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in table["image"].to_pylist()])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(trained.encode_image(pixels), dim=-1).numpy()
        torch.manual_seed(0)
        untrained = open_clip.create_model(f"local-dir:{model}", pretrained=None)
        untrained.eval()
        init = torch.nn.functional.normalize(untrained.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(used, ref, atol=2e-3)
    assert np.abs(used - init).max() > 1e-2  # the checkpoint's weights, not an initialisation
