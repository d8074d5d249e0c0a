"""Concept labels end to end (issue 12 item 4): SBCL subclasses of a zero-shot label, SBCL's
stratified fit sample when a head class is larger than the sample, hierarchy levels in M4's
``associate``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from corpora import tiny_open_clip_dir, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _emb(x: np.ndarray, dtype=np.float32) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(dtype)), x.shape[1])


def _run_frame(out) -> pl.DataFrame:
    """Manifest rows joined with their scan and assign tags."""
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "manifest").glob("*.parquet"))])
    parts = []
    for shard in json.loads((out / "shards.json").read_text()):
        t = pl.read_parquet(out / "tags" / f"{shard['shard_id']}.parquet")
        t = pl.concat([t, pl.read_parquet(out / "assign" / f"{shard['shard_id']}.parquet").drop("row")], how="horizontal")
        parts.append(t.with_columns(pl.lit(shard["relpath"]).alias("shard")))
    return manifest.join(pl.concat(parts, how="diagonal"), on=["shard", "row", "uid"], how="left")


def _sbcl_counts(sizes: dict[str, int], m0: int) -> dict[str, int]:
    floor_size = max(min(sizes.values()), m0)
    return {c: max(1, n // floor_size) for c, n in sizes.items()}


def test_subclasses_of_a_zero_shot_label(tmp_path):
    pytest.importorskip("open_clip")
    from mmbalance.data import load_vocabulary
    from mmbalance.operators.embed.model import load_model
    from mmbalance.operators.zero_shot import vocabulary_embeddings
    from mmbalance.schemas.embed import EmbedSpec

    model_dir = tiny_open_clip_dir(tmp_path / "tiny")
    vocab = dataclasses.replace(load_vocabulary("perceived_gender"), values=("woman", "man"))
    bundle = load_model(EmbedSpec(model=f"local-dir:{model_dir}", pretrained="random"))
    classes = vocabulary_embeddings(vocab, bundle.encode_texts).matrix  # woman, man, none
    rng = np.random.default_rng(1)
    n = 1200
    truth = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    gap = min(np.linalg.norm(classes[i] - classes[j]) for i in range(3) for j in range(i + 1, 3))
    emb = _unit(classes[truth] + rng.normal(0, 0.1 * gap / np.sqrt(classes.shape[1]), (n, classes.shape[1])))
    table = pa.table({"uid": [f"z{i}" for i in range(n)], "image_emb": _emb(emb)})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 600), "b.parquet": table.slice(600)})
    zero_shot = {"vocabulary": "perceived_gender", "sides": ["image"], "temperature": 1e-4, "threshold": 0.0,
                 "model": f"local-dir:{model_dir}", "pretrained": "random"}
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "labels": [{"name": "person", "source": "zero_shot", "zero_shot": zero_shot, "values": ["woman", "man"]}],
        "subclasses": [{"name": "person_sub", "of": "person", "m0": 50}],
        "sample": {"size": 800},
        "report": {"leakage": False},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    frame = _run_frame(tmp_path / "o")
    assert frame.height == n
    tagged = frame.filter(pl.col("tag.person").is_not_null())
    assert (tagged["tag.person"] == pl.Series([["woman", "man"][t] for t in truth[tagged["row"].to_numpy() + (tagged["shard"] == "b.parquet").to_numpy() * 600]])).mean() >= 0.95
    # every tagged row has a subclass of its own class; untagged rows have none
    assert tagged["tag.person_sub"].null_count() == 0
    assert all(sub.split("/")[0] == cls for sub, cls in zip(tagged["tag.person_sub"], tagged["tag.person"]))
    assert frame.filter(pl.col("tag.person").is_null())["tag.person_sub"].null_count() == n - tagged.height
    fit = result.report["fit"]["person_sub"]
    assert fit["class_sizes_exact"] is False  # zero-shot classes exist only after assignment: n_c estimated
    meta = json.loads((tmp_path / "o" / "models" / "person_sub.json").read_text())
    expected = _sbcl_counts(meta["class_sizes"], 50)
    assert dict(zip(meta["classes"], meta["counts"])) == expected and expected["woman"] > 1
    per_class = dict(tagged.group_by("tag.person").agg(pl.col("tag.person_sub").n_unique()).iter_rows())
    assert per_class == expected


def test_head_class_larger_than_the_sample_gets_its_subclasses(tmp_path):
    """SBCL's fit sample is stratified by class with caps min(n_c, K_c * p): the head class (3,000
    rows, three times the sample) is fitted from K_c * p rows, and a 3-row tail class that a
    uniform 1,000-row sample would likely miss is fitted from all its rows."""
    rng = np.random.default_rng(7)
    sizes = {"head": 3000, "mid": 400, "tail": 3}
    dim, m0, sample_size = 24, 50, 1000
    occupation = np.concatenate([np.full(n, c) for c, n in sizes.items()])
    # each class: a few planted sub-concepts around its own direction
    parts = []
    for c, n in sizes.items():
        centre = _unit(rng.normal(size=(1, dim)))
        subs = _unit(centre + 0.6 * rng.normal(size=(8, dim)) / np.sqrt(dim))
        parts.append(_unit(subs[rng.integers(0, 8, n)] + 0.5 * rng.normal(size=(n, dim)) / np.sqrt(dim)))
    emb = np.concatenate(parts)
    order = rng.permutation(len(emb))
    table = pa.table({"uid": [f"r{i}" for i in range(len(emb))], "image_emb": _emb(emb[order], np.float16),
                      "occupation": occupation[order]})
    third = table.num_rows // 3
    corpus = write_shards(tmp_path / "c", {"s0.parquet": table.slice(0, third), "s1.parquet": table.slice(third, third),
                                           "s2.parquet": table.slice(2 * third)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "labels": [{"name": "occupation"}],
        "subclasses": [{"name": "occ_sub", "of": "occupation", "m0": m0}],
        "sample": {"size": sample_size, "seed": 3},
        "report": {"leakage": False},
    })
    assert sizes["head"] > sample_size
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    frame = _run_frame(tmp_path / "o")

    # SBCL counts from the exact class sizes
    k = _sbcl_counts(sizes, m0)
    # caps: the largest p <= points_per_subclass (64) with sum_c min(n_c, K_c p) <= sample.size
    p = max(q for q in range(1, 65) if sum(min(sizes[c], k[c] * q) for c in sizes) <= sample_size)
    caps = {c: min(sizes[c], k[c] * p) for c in sizes}
    fit = result.report["fit"]["occ_sub"]
    assert fit["class_sizes_exact"] and fit["subclasses"] == sum(k.values())
    assert fit["fit_caps"] == caps and fit["points_per_subclass"] == p and fit["fit_rows"] == sum(caps.values())
    meta = json.loads((tmp_path / "o" / "models" / "occ_sub.json").read_text())
    assert dict(zip(meta["classes"], meta["fit_points"])) == caps  # every chosen row reached the fit
    assert caps["head"] >= 10 * k["head"] and caps["tail"] == sizes["tail"]
    # the uniform sample misses tail rows the stratified fit has: those were read from their shard
    sample = pl.read_parquet(tmp_path / "o" / "fit" / "sample.parquet")
    assert (sample["tag.occupation"] == "tail").sum() < caps["tail"] and fit["shards_read_for_embeddings"] >= 1
    per_class = dict(frame.group_by("tag.occupation").agg(pl.col("tag.occ_sub").n_unique()).iter_rows())
    assert per_class == k
    assert all(v.split("/")[0] == o for v, o in zip(frame["tag.occ_sub"], frame["tag.occupation"]))


def test_hierarchy_levels_are_labels_m4_can_associate(tmp_path):
    rng = np.random.default_rng(11)
    dim, per = 24, 300
    top = _unit(rng.normal(size=(3, dim)))
    leaves = _unit(np.repeat(top, 3, axis=0) + 0.7 * rng.normal(size=(9, dim)) / np.sqrt(dim) * 3)
    truth = np.repeat(np.arange(9), per)
    emb = _unit(leaves[truth] + 0.3 * rng.normal(size=(len(truth), dim)) / np.sqrt(dim))
    # gender strongly tied to the top-level concept: 80% women under concept 0, 20% elsewhere
    p_woman = np.where(truth // 3 == 0, 0.8, 0.2)
    gender = np.where(rng.random(len(truth)) < p_woman, "woman", "man").astype(object)
    gender[rng.random(len(truth)) < 0.1] = None
    order = rng.permutation(len(truth))
    table = pa.table({"uid": [f"h{i}" for i in range(len(truth))], "image_emb": _emb(emb[order]),
                      "gender": pa.array(gender[order].tolist(), pa.string())})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 1350), "b.parquet": table.slice(1350)})
    eps = 0.01
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
        "clusters": [{"name": "concept", "k": 9, "levels": [3], "seed": 1}],
        "sample": {"size": 2000},
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                    "associate": [["gender", "concept_l2"]],
                    "tolerance": {"representation": 0.01, "association": eps}, "retention": 0.7,
                    "on_infeasible": "max_retention"},
        "report": {"leakage": False},
    })
    assert "concept_l2" in recipe.label_names()
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert result.report["vocabulary_sizes"]["concept_l2"] == 3
    frame = _run_frame(tmp_path / "o").filter(pl.col("tag.gender").is_not_null())
    w = frame["weight"].to_numpy()
    s = (frame["tag.gender"] == "woman").to_numpy().astype(float) - 0.5
    before, after = [], []
    for value in frame["tag.concept_l2"].unique().to_list():
        y = (frame["tag.concept_l2"] == value).to_numpy()
        before.append(abs(np.sum(s * y)) / len(s))
        after.append(abs(np.sum(w * s * y)) / w.sum())
    assert max(before) > 5 * eps  # the planted association at the top level
    assert max(after) <= eps + 1e-6  # held on every level-2 value under the solved weights


@pytest.mark.parametrize("sizes, m0, per, budget", [({"a": 5000, "b": 70, "c": 7}, 10, 64, 4000),
                                                    ({"a": 900, "b": 900}, 30, 64, 100_000),
                                                    ({"a": 12, "b": 1}, 1, 5, 13)])
def test_subclass_caps_fill_the_budget_by_the_sbcl_rule(sizes, m0, per, budget):
    from mmbalance.pipeline.fit import subclass_caps

    caps, p = subclass_caps(sizes, m0, per, budget)
    k = _sbcl_counts(sizes, m0)
    total = lambda q: sum(min(sizes[c], k[c] * q) for c in sizes)  # noqa: E731
    assert p == max(q for q in range(1, per + 1) if total(q) <= budget)  # brute force over p
    assert caps == {c: min(sizes[c], k[c] * p) for c in sizes} and all(caps[c] >= min(k[c], sizes[c]) for c in sizes)


def test_too_many_subclasses_for_the_sample_is_a_clear_error():
    from mmbalance.pipeline.fit import subclass_caps
    from mmbalance.schemas.contract import InputError

    with pytest.raises(InputError, match="1001 SBCL subclasses need at least as many fit rows, but sample.size is 500"):
        subclass_caps({"a": 10_000, "b": 10}, 10, 64, 500)
