import numpy as np
import pyarrow as pa
import pytest

from mmbalance.operators.leakage import leakage_report
from mmbalance.schemas.recipe import parse_recipe


def _sample(n=6000, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    occ = rng.choice(["nurse", "pilot", "chef"], size=n, p=[0.4, 0.4, 0.2])
    p_woman = np.select([occ == "nurse", occ == "pilot"], [0.9, 0.1], 0.5)
    woman = rng.random(n) < p_woman
    gender = np.where(woman, "woman", "man")
    direction = rng.normal(size=dim)
    emb = rng.normal(size=(n, dim)) + np.where(woman, 1.5, -1.5)[:, None] * direction / np.linalg.norm(direction)
    return pa.table({
        "uid": [f"u{i}" for i in range(n)],
        "priority": pa.array(rng.integers(0, 2**63, n).astype(np.uint64) * 2, pa.uint64()),
        "tag.gender": gender, "tag.occ": occ,
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float16)), dim),
    }), gender, occ


def test_reweighing_removes_dataset_leakage_but_not_embedding_leakage():
    sample, gender, occ = _sample()
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    n = len(gender)
    # Kamiran-Calders weights: s and y independent under w
    w = np.empty(n)
    for s in ("woman", "man"):
        for y in ("nurse", "pilot", "chef"):
            cell = (gender == s) & (occ == y)
            w[cell] = (gender == s).sum() * (occ == y).sum() / (n * cell.sum())
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, w, max_rows=n)
    ds = out["gender"]["dataset"]
    assert ds["before"]["accuracy"] > ds["before"]["majority_rate"] + 0.15  # occupation predicts gender
    assert ds["after"]["excess"] == pytest.approx(0.0, abs=0.03)  # independence: nothing to learn
    emb = out["gender"]["embedding_image"]
    assert emb["before"]["accuracy"] > 0.85 and emb["after"]["accuracy"] > 0.85  # balancing labels leaves this
    assert out["sample_rows"] == n and ds["before"]["test_rows"] + ds["before"]["train_rows"] == n


def test_zero_weights_are_excluded_and_tiny_inputs_give_none():
    sample, gender, occ = _sample(n=40)
    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}]})
    out = leakage_report(sample, recipe, {"gender": ["woman", "man"], "occ": ["chef", "nurse", "pilot"]}, np.zeros(40), max_rows=40)
    assert out["gender"]["dataset"]["after"] is None
