"""The R&B training loop of benchmarks/bench_model_bias.py (benchmarks/model_bias_loop.py): its
re-traced encoders are open_clip's, the per-domain final-layer gradients it gives OnlineMixer add
up to autograd's gradient of the projections, and a few online steps train and move the mixture."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

for _mod in ("torch", "open_clip"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed (embed extra)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import model_bias_loop as loop  # noqa: E402

from mmbalance.synth_images import OCCUPATIONS, train_table  # noqa: E402

TINY = {"model_cfg": {"embed_dim": 16,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "preprocess_cfg": {}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    model_dir = tmp_path_factory.mktemp("tiny")
    (model_dir / "open_clip_config.json").write_text(json.dumps(TINY))
    t = train_table(48, seed=0)
    names = list(OCCUPATIONS)
    pool = loop.Pool([Image.open(io.BytesIO(b)).convert("RGB") for b in t.column("image").to_pylist()],
                     t.column("caption").to_pylist(), np.array([names.index(o) for o in t.column("occupation").to_pylist()]), names)
    return model_dir, pool


def test_domain_gradients_sum_to_the_projection_gradients(setup):
    import open_clip
    import torch

    model_dir, pool = setup
    torch.manual_seed(0)
    model, preprocess, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    loop._check_encode(model, preprocess, tokenizer, pool)  # raises if the re-trace drifts from open_clip
    images = torch.stack([preprocess(im) for im in pool.images[:16]])
    f_img, f_txt, (x_img, y_img, x_txt, y_txt) = loop._encode(model, images, tokenizer(pool.captions[:16]))
    y_img.retain_grad()
    y_txt.retain_grad()
    open_clip.ClipLoss()(f_img, f_txt, model.logit_scale.exp()).backward()
    m = len(pool.domains)
    g = loop.domain_gradients(x_img, y_img, x_txt, y_txt, torch.from_numpy(pool.domain[:16]), m)
    whole = torch.cat([model.visual.proj.grad.flatten(), model.text_projection.grad.flatten()])
    assert torch.allclose(g.sum(0), whole, atol=1e-6, rtol=1e-5)
    absent = np.setdiff1d(np.arange(m), pool.domain[:16])
    assert torch.all(g[torch.from_numpy(absent)] == 0)  # a domain without samples has no gradient


def test_online_steps_train_and_move_the_mixture(setup):
    model_dir, pool = setup
    cfg = loop.LoopConfig(model_dir=str(model_dir), steps=4, batch_size=8, lr=1e-3, warmup=1, round_steps=2)
    result = loop.train(pool, cfg, online=True)
    assert len(result.mixtures) == 2 and result.mixtures[0] == pytest.approx([1 / len(pool.domains)] * len(pool.domains))
    assert sum(result.mixtures[1]) == pytest.approx(1.0) and result.mixtures[1] != result.mixtures[0]
    assert np.all(np.isfinite(result.losses)) and 0 < result.mixer_seconds < result.seconds
