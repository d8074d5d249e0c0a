"""M4 with per-label parity and embedding moments in a run (local and Ray): every conditional share
and embedding moment recomputed in numpy from the manifest joined with the input's own tags and
embeddings; the report's families against that recomputation; reruns reproduce the bytes."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from corpora import write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe

DIM = 16
MIN_SUPPORT = 30


def _shard(rows: int, seed: int) -> pa.Table:
    """Gender skews occupation, concept and a latent scene direction in both embeddings."""
    rng = np.random.default_rng(seed)
    occ = rng.choice(6, rows)
    concept = rng.choice(40, rows, p=np.arange(1, 41) ** -1.0 / (np.arange(1, 41) ** -1.0).sum())
    p_woman = 1 / (1 + np.exp(-(0.8 * (occ - 2.5) / 2.5 + np.sin(concept))))
    woman = rng.random(rows) < p_woman
    gender = np.where(rng.random(rows) < 0.15, None, np.where(woman, "woman", "man"))
    scenes = np.random.default_rng(0).normal(size=(5, DIM))
    scene = np.where(woman, rng.choice(5, rows, p=[0.35, 0.25, 0.2, 0.1, 0.1]), rng.choice(5, rows, p=[0.1, 0.1, 0.2, 0.25, 0.35]))
    image = scenes[scene] + rng.normal(0, 1.0, (rows, DIM))
    text = scenes[scene] + rng.normal(0, 1.3, (rows, DIM))

    def fixed(m):
        return pa.FixedSizeListArray.from_arrays(pa.array(m.astype(np.float16).ravel()), DIM)

    return pa.table({"uid": [f"u{seed}-{i}" for i in range(rows)], "image_emb": fixed(image), "text_emb": fixed(text),
                     "gender": pa.array(gender.tolist(), pa.string()), "occupation": [f"o{o}" for o in occ],
                     "concept": [f"c{c}" for c in concept]})


RECIPE = {
    "input": {"columns": {"uid": "uid", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
    "attributes": [{"name": "gender", "values": ["woman", "man"]}],
    "labels": [{"name": "occupation"}, {"name": "concept"}],
    "sample": {"size": 3000, "seed": 0},
    "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                "associate": [["gender", "occupation"], ["gender", "concept"], ["gender", "embedding.image"]],
                "tolerance": {"representation": 0.01, "association": None, "association_per_label": 0.05,
                              "association_embedding": 0.01},
                "min_support": MIN_SUPPORT, "embedding_components": 8, "retention": 0.6, "max_weight": 1.0,
                "on_infeasible": "max_retention"},
    "report": {"html": False, "leakage": True, "leakage_rows": 3000},
}


def _frame(out, corpus) -> pl.DataFrame:
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p) for p in sorted(corpus.glob("*.parquet"))])
    return manifest.join(truth, on="uid")


def _projected(frame: pl.DataFrame, out) -> tuple[np.ndarray, np.ndarray]:
    """z = (x / |x| - mean) V' in float64 from the fitted basis file, and each component's sd."""
    stacked = np.load(out / "models" / "pca_image.npy").astype(np.float64)
    meta = json.loads((out / "models" / "pca_image.json").read_text())
    x = np.asarray(frame["image_emb"].to_list(), np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x - stacked[0]) @ stacked[1:].T, np.asarray(meta["sd"])


def _check(frame: pl.DataFrame, out, report: dict) -> None:
    carrying = frame.filter(pl.col("gender").is_not_null())
    w = carrying["weight"].to_numpy()
    woman = (carrying["gender"] == "woman").to_numpy()
    W = w.sum()
    assert abs(w[woman].sum() / W - 0.5) <= 0.01 + 1e-7
    # per-label parity: every concept and occupation with enough support, the rest pooled
    worst_after = 0.0
    for label in ("occupation", "concept"):
        values = carrying[label].to_numpy()
        names, counts = np.unique(values, return_counts=True)
        small = set(names[counts < MIN_SUPPORT])
        groups = [(n, values == n) for n in names if n not in small] + ([("pooled", np.isin(values, list(small)))] if small else [])
        for _, rows in groups:
            share = w[rows & woman].sum() / w[rows].sum()
            assert abs(share - 0.5) <= 0.05 + 1e-7
            worst_after = max(worst_after, abs(share - 0.5)) if label == "concept" else worst_after
        family = next(f for f in report["constraint_families"] if f["family"] == f"gender | {label} (per label)")
        assert sorted(family["pooled_values"]) == sorted(small)
    concept = next(f for f in report["constraint_families"] if f["family"] == "gender | concept (per label)")
    assert concept["worst_moment"]["after_expected"] == pytest.approx(worst_after, abs=1e-9)
    assert concept["worst_moment"]["before"] > 0.1 and concept["at_tolerance"] > 0
    # embedding moments: |sum_w (s_v - 1/2) z_k| <= eps sd_k W, z recomputed from the input's embeddings
    z, sd = _projected(carrying, out)
    moments = np.array([((woman == v) - 0.5) * w @ z for v in (True, False)]) / (sd * W)
    assert np.abs(moments).max() <= 0.01 * (1 + 1e-5)
    before = np.array([((woman == v) - 0.5) @ z for v in (True, False)]) / (sd * len(w))
    assert np.abs(before).max() > 0.05
    family = next(f for f in report["constraint_families"] if f["kind"] == "embedding")
    assert family["family"] == "gender x embedding.image (8 PCs)" and family["at_tolerance"] > 0
    assert family["worst_moment"]["after_expected"] == pytest.approx(np.abs(moments).max(), rel=1e-4)
    assert family["worst_moment"]["before"] == pytest.approx(np.abs(before).max(), rel=1e-4)
    assert report["solution"]["status"] in ("optimal", "solved_at_largest_feasible_retention")
    assert report["solution"]["max_violation"] <= 1e-9


def test_per_label_and_embedding_moments_hold_on_the_manifest_local_and_ray(tmp_path, ray_cluster):
    corpus = write_shards(tmp_path / "c", {f"s{i}.parquet": _shard(1500, i) for i in range(3)})
    recipe = parse_recipe(RECIPE)
    manifests = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        result = rebalance(str(corpus), str(out), recipe, RunOptions(executor=executor, show_progress=False, html_report=False))
        _check(_frame(out, corpus), out, result.report)
        manifests[executor] = {p.name: p.read_bytes() for p in (out / "manifest").iterdir()}
        assert not (out / "solve" / "stream").exists()
    assert manifests["ray"] == manifests["local"]
    # the leakage probes weigh the sample rows by the same per-row solution
    leak = result.report["leakage"]["gender"]["embedding_image"]
    assert leak["after"]["accuracy"] < leak["before"]["accuracy"]
    # a rerun after losing one shard's manifest redoes only that shard, byte for byte
    out = tmp_path / "local"
    victim = sorted((out / "manifest").iterdir())[1]
    victim.unlink()
    for marker in (out / "_done" / "weigh").iterdir():
        if marker.stem == victim.stem:
            marker.unlink()
    rebalance(str(corpus), str(out), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    assert {p.name: p.read_bytes() for p in (out / "manifest").iterdir()} == manifests["local"]
