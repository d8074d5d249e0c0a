"""``mmbalance evaluate`` against an independent implementation.

A tiny CLIP and a tiny SigLIP (tests/corpora.py) are trained here for a few dozen steps on the
evaluation images and their captions (so predictions vary), saved the way a distributed
open_clip_train run saves them (``state_dict`` under ``module.``), and evaluated. The test then
  * checks the embeddings the run used against open_clip's own forward pass of a model built from
    the checkpoint by hand, and the prompts against the templates filled by hand;
  * recomputes every figure and every bootstrap interval from those raw embeddings with the numpy
    below, written from docs/algorithms.md section 9 without the package's code (lists of resampled
    indices instead of weight matrices, sorting instead of cumulative counts), to 1e-9.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from corpora import TINY_OPEN_CLIP, TINY_SIGLIP
from evaluate_sets import eval_table, model_dir, write_eval_set

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from mmbalance.pipeline.evaluate import EvaluateOptions, evaluate  # noqa: E402
from mmbalance.schemas.evaluate import load_eval_recipe  # noqa: E402

ROWS, SEED, SAMPLES, KS, RECALL_KS, CONFIDENCE = 72, 3, 40, [5, 10, 1000], [1, 5], 0.95
UNLABELLED = 0.15  # images without an occupation: no gender prediction (its prompts name the occupation)


def _images(model, table):
    from PIL import Image

    pre = open_clip.image_transform(model.visual.image_size, is_train=False)
    return torch.stack([pre(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])


def train_checkpoint(directory: Path, table, path: Path, siglip: bool, steps: int = 40) -> None:
    """A few optimiser steps on the set's own captions, saved as open_clip_train does under DDP."""
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{directory}", pretrained=None)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    images, texts = _images(model, table), tokenizer(table.column("caption").to_pylist())
    loss_fn = open_clip.loss.SigLipLoss() if siglip else open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        batch = torch.from_numpy(rng.choice(len(texts), 24, replace=False))
        loss = loss_fn(*model(images[batch], texts[batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"epoch": 1, "name": "t", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def evaluated(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"ev-{request.param}")
    siglip = request.param == "siglip"
    model = model_dir(base / "model", TINY_SIGLIP if siglip else TINY_OPEN_CLIP)
    ckpt = base / "epoch_1.pt"
    train_checkpoint(model, eval_table(ROWS, SEED, unlabelled=UNLABELLED), ckpt, siglip)
    path, recipe = write_eval_set(base / "set", ROWS, SEED, model, weights=f"checkpoint: {ckpt}", samples=SAMPLES,
                                  unlabelled=UNLABELLED)
    text = recipe.read_text().replace("retrieval: {k: [5, 10, 1000]}", f"retrieval: {{k: {KS}}}")
    recipe.write_text(text)
    doc = evaluate(str(path), str(base / "out"), load_eval_recipe(recipe), EvaluateOptions())
    return {"doc": doc, "out": base / "out", "path": path, "model": model, "ckpt": ckpt, "siglip": siglip}


# -- the raw inputs of the figures -------------------------------------------------------------------


def _raw(out: Path, path: Path):
    emb = pq.read_table(next((out / "embeddings").glob("*.parquet"))).sort_by("row")
    source = pq.read_table(path).take(emb.column("row"))
    image = np.array(emb.column("image_emb").to_pylist(), np.float64)
    text = np.array(emb.column("text_emb").to_pylist(), np.float64)
    return source, image, text, pq.read_table(out / "prompts.parquet").to_pylist()


def test_embeddings_and_prompts_are_open_clips(evaluated):
    """The run's inputs: open_clip's forward pass of the checkpoint's weights, loaded by hand."""
    state = torch.load(evaluated["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    model = open_clip.create_model(f"local-dir:{evaluated['model']}", pretrained=None)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{evaluated['model']}")
    source, image, text, prompts = _raw(evaluated["out"], evaluated["path"])
    with torch.no_grad():
        ref_image = torch.nn.functional.normalize(model.encode_image(_images(model, source)), dim=-1).numpy()
        ref_text = torch.nn.functional.normalize(model.encode_text(tokenizer(source.column("caption").to_pylist())), dim=-1).numpy()
        ref_prompts = torch.nn.functional.normalize(model.encode_text(tokenizer([p["prompt"] for p in prompts])), dim=-1).numpy()
    np.testing.assert_allclose(image, ref_image, atol=2e-3)  # stored as float16
    np.testing.assert_allclose(text, ref_text, atol=2e-3)
    np.testing.assert_allclose(np.array([p["text_emb"] for p in prompts], np.float64), ref_prompts, atol=2e-3)
    filled = {(p["kind"], p["condition"], p["value"], p["prompt"]) for p in prompts}
    expected = {("label", None, o, t) for o in ("chef", "nurse", "pilot", "welder") for t in (f"a photo of a {o}.", f"a {o} at work.")}
    expected |= {("attribute", o, g, t) for o in ("chef", "nurse", "pilot", "welder") for g in ("woman", "man")
                 for t in (f"a photo of a {g} working as a {o}", f"a {g}, a {o}")}
    assert filled == expected
    doc = evaluated["doc"]
    assert doc["model"]["checkpoint_sha256"] == hashlib.sha256(evaluated["ckpt"].read_bytes()).hexdigest()
    assert doc["model"]["scoring"] == ("sigmoid" if evaluated["siglip"] else "softmax")
    if evaluated["siglip"]:
        assert doc["model"]["logit_scale"] == pytest.approx(math.exp(float(state["module.logit_scale"])))
        assert doc["model"]["logit_bias"] == pytest.approx(float(state["module.logit_bias"]))


# -- the independent implementation --------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _class(prompts, kind, condition, values) -> np.ndarray:
    """Unit prompt embeddings averaged per value, normalised, kept in float32 (as recorded)."""
    rows = []
    for v in values:
        e = np.array([p["text_emb"] for p in prompts if (p["kind"], p["condition"], p["value"]) == (kind, condition, v)], np.float64)
        rows.append(_unit(_unit(e).mean(axis=0)))
    return np.array(rows).astype(np.float32).astype(np.float64)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _skews(seq: list[int], values: int, ks: list[int]):
    """MaxSkew@k per k and NDKL of one ranking (a list of value codes), straight from the formulas."""
    n = len(seq)
    pool = [seq.count(v) / n for v in range(values)]
    skews = {}
    for k in ks:
        if k > n:
            continue
        top = [seq[:k].count(v) / k for v in range(values)]
        skews[k] = max((math.log(t / p) if t > 0 else -math.inf) for t, p in zip(top, pool) if p > 0)
    z = sum(1 / math.log2(i + 1) for i in range(1, n + 1))
    ndkl = sum(_kl([seq[:i].count(v) / i for v in range(values)], pool) / math.log2(i + 1) for i in range(1, n + 1)) / z
    return skews, ndkl


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _max(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return max(xs) if xs else math.nan


def independent_figures(source, image, text, prompts, seed: int):
    """A function of a list of resampled image indices -> {path: value}, for every figure."""
    occ = source.column("occupation").to_pylist()
    gender = source.column("gender").to_pylist()
    uids = source.column("uid").to_pylist()
    occ_values, g_values = sorted(set(occ) - {None}), ["woman", "man"]
    img, txt = _unit(image), _unit(text)
    labels = _class(prompts, "label", None, occ_values)
    pred_occ = [int(np.argmax(labels @ img[i])) for i in range(len(occ))]
    by_occ = {o: _class(prompts, "attribute", o, g_values) for o in occ_values}
    pred_g = [int(np.argmax(by_occ[occ[i]] @ img[i])) if occ[i] is not None else None for i in range(len(occ))]
    cued = [i for i in range(len(occ)) if gender[i] is not None]
    key = {i: hashlib.blake2b(f"{seed}:{uids[i]}".encode(), digest_size=8).digest() for i in cued}
    per_value = [sorted((i for i in cued if gender[i] == g), key=lambda i: (key[i], i)) for g in g_values]
    m = min(len(x) for x in per_value)
    pool = sorted(i for x in per_value for i in x[:m])
    position = {i: p for p, i in enumerate(pool)}
    sims = img @ txt.T
    rank_i2t = [sum(1 for j in range(len(occ)) if sims[q, j] > sims[q, q] or (sims[q, j] == sims[q, q] and j < q)) for q in range(len(occ))]
    rank_t2i = [sum(1 for j in range(len(occ)) if sims[j, q] > sims[q, q] or (sims[j, q] == sims[q, q] and j < q)) for q in range(len(occ))]

    def share(items, test):
        return sum(1 for i in items if test(i)) / len(items) if items else math.nan

    def figures(idx: list[int]) -> dict[tuple, float]:
        out = {("labels", "occupation", "accuracy"): share([i for i in idx if occ[i] is not None],
                                                           lambda i: occ_values[pred_occ[i]] == occ[i])}
        for o in occ_values:
            out[("labels", "occupation", "by_value", o, "accuracy")] = share([i for i in idx if occ[i] == o], lambda i: pred_occ[i] == occ_values.index(o))
        a = ("attributes", "gender")
        neutral = [i for i in idx if gender[i] is None and pred_g[i] is not None]  # scored neutral images
        overall = {g: share(neutral, lambda i, g=g: g_values[pred_g[i]] == g) for g in g_values}
        for g in g_values:
            out[a + ("share", g)] = overall[g]
            out[a + ("ab", "occupation", "overall_share", g)] = overall[g]
        out[a + ("rb",)] = max(abs(overall[g] - 0.5) for g in g_values)
        out[a + ("accuracy",)] = share([i for i in idx if gender[i] is not None and pred_g[i] is not None],
                                       lambda i: g_values[pred_g[i]] == gender[i])
        gaps = []
        for o in occ_values:
            mine = [i for i in neutral if occ[i] == o]
            shares = {g: share(mine, lambda i, g=g: g_values[pred_g[i]] == g) for g in g_values}
            gap = max(abs(shares[g] - overall[g]) for g in g_values) if mine else math.nan
            gaps.append(gap)
            out[a + ("ab", "occupation", "by_label", o, "gap")] = gap
            for g in g_values:
                out[a + ("ab", "occupation", "by_label", o, "share", g)] = shares[g]
        out[a + ("ab", "occupation")] = _max(gaps)
        r = a + ("retrieval", "occupation")
        drawn = [i for i in idx if i in position]
        skews, ndkls = {k: [] for k in KS if k <= len(pool)}, []
        for j, o in enumerate(occ_values):
            ranking = sorted(drawn, key=lambda i: (-(labels[j] @ img[i]), position[i]))
            s, nd = _skews([g_values.index(gender[i]) for i in ranking], 2, list(skews))
            out[r + ("by_query", o, "ndkl")] = nd
            ndkls.append(nd)
            for k in skews:
                out[r + ("by_query", o, "max_skew", str(k))] = s.get(k, math.nan)
                skews[k].append(s.get(k, math.nan))
        out[r + ("ndkl",)], out[r + ("ndkl_worst",)] = _mean(ndkls), _max(ndkls)
        for k, values in skews.items():
            out[r + ("max_skew", str(k))], out[r + ("max_skew_worst", str(k))] = _mean(values), _max(values)
        for k in RECALL_KS:
            out[("retrieval", "image_to_text", f"recall@{k}")] = share(idx, lambda i: rank_i2t[i] < k)
            out[("retrieval", "text_to_image", f"recall@{k}")] = share(idx, lambda i: rank_t2i[i] < k)
        return out

    return figures, {"pred_occ": pred_occ, "pred_g": pred_g, "pool": pool}


def _figure_paths(doc, prefix=()):
    if isinstance(doc, dict):
        if "value" in doc and "ci" in doc:
            yield prefix
        for k, v in doc.items():
            yield from _figure_paths(v, prefix + (k,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def test_every_figure_and_interval_matches_an_independent_numpy(evaluated):
    doc = evaluated["doc"]
    source, image, text, prompts = _raw(evaluated["out"], evaluated["path"])
    figures, seen = independent_figures(source, image, text, prompts, SEED)
    n = len(source)
    point = figures(list(range(n)))
    rng = np.random.default_rng(SEED)
    replicates = [figures(rng.integers(0, n, size=n).tolist()) for _ in range(SAMPLES)]
    reported = set(_figure_paths({k: doc[k] for k in ("attributes", "labels", "retrieval")}))
    assert reported == set(point)  # no figure left unchecked, none missing
    assert len(point) >= 45
    for path, value in point.items():
        fig = _get(doc, path)
        if math.isnan(value):
            assert fig["value"] is None and fig["ci"] is None, path
            continue
        assert fig["value"] == pytest.approx(value, abs=1e-9), path
        reps = np.array([r[path] for r in replicates], np.float64)
        reps = reps[~np.isnan(reps)]
        lo, hi = np.quantile(reps, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
        assert fig["ci"] == pytest.approx([lo, hi], abs=1e-9), path
    # the check has teeth: the trained CLIP's predictions vary (the tiny SigLIP learns nothing in a few
    # dozen steps, its predictions are constant: that variant checks the sigmoid path and the plumbing)
    if not evaluated["siglip"]:
        assert len(set(seen["pred_occ"])) >= 2 and len({g for g in seen["pred_g"] if g is not None}) >= 2
    assert doc["attributes"]["gender"]["retrieval"]["occupation"]["k_skipped"] == [1000]
    assert len(seen["pool"]) == doc["attributes"]["gender"]["retrieval"]["occupation"]["pool"]["images"]
    occ, gender = source.column("occupation").to_pylist(), source.column("gender").to_pylist()
    unscored = sum(1 for o, g in zip(occ, gender) if o is None and g is None)
    assert unscored > 0 and doc["attributes"]["gender"]["images"]["unscored"] == unscored
    assert doc["labels"]["occupation"]["images"] == sum(o is not None for o in occ) < n
