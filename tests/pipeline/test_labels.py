"""Labels beyond given columns: caption-lexicon tags with an audit, clusters and SBCL subclasses."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import write_shards
from sklearn.metrics import adjusted_rand_score

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import synth_corpus

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def _manifest_with_tags(out) -> pl.DataFrame:
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "manifest").glob("*.parquet"))])
    tags = []
    for shard in json.loads((out / "shards.json").read_text()):
        t = pl.read_parquet(out / "tags" / f"{shard['shard_id']}.parquet")
        assign = out / "assign" / f"{shard['shard_id']}.parquet"
        if assign.exists():
            t = pl.concat([t, pl.read_parquet(assign).drop("row")], how="horizontal")
        tags.append(t.with_columns(pl.lit(shard["relpath"]).alias("shard")))
    return manifest.join(pl.concat(tags, how="diagonal"), on=["shard", "row", "uid"], how="left")


def test_caption_tags_with_combination_and_audit(tmp_path):
    captions = ["a woman repairing a car", "the man and his dog", "portrait of a manager", "she is a nurse",
                "no women here, just a field", "he and she dancing", None, "Women's team photo"]
    given = ["woman", None, None, "man", None, "man", "woman", None]
    expected_caption = ["woman", "man", None, "woman", None, None, None, "woman"]
    table = pa.table({"uid": [f"u{i}" for i in range(8)], "caption": captions, "gender": given})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption"}},
        "attributes": [
            {"name": "from_caption", "source": "caption", "caption": {"vocabulary": "perceived_gender"}, "values": ["woman", "man"]},
            {"name": "gender", "source": ["column", "caption"], "column": "gender", "values": ["woman", "man"],
             "caption": {"vocabulary": "perceived_gender"}, "combine": "any"},
        ],
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    tags = pq.read_table(next((tmp_path / "o" / "tags").glob("*.parquet"))).to_pydict()
    assert tags["tag.from_caption"] == expected_caption
    # any: the value every tagging source agrees on; disagreement (row 3: column man, caption woman) gives null
    assert tags["tag.gender"] == ["woman", "man", None, None, None, "man", "woman", "woman"]
    assert tags["fired.gender"][3] == 0b11 and tags["fired.gender"][1] == 0b10 and tags["fired.gender"][2] == 0
    audit = result.report["audit"]["gender"]
    assert audit["rows"] == 8
    assert audit["sources"]["caption"]["tagged"] == 4 and audit["sources"]["column"]["tagged"] == 4
    assert audit["agreement"]["column|caption"]["both_tagged"] == 2
    assert audit["agreement"]["column|caption"]["agreement"] == pytest.approx(0.5)
    assert sorted(audit["sample_uids"]["woman"]) == ["u0", "u6", "u7"]


def test_recipe_needs_a_caption_column_for_caption_sources():
    from mmbalance.schemas.recipe import RecipeError

    with pytest.raises(RecipeError, match="input.columns.caption is not set"):
        parse_recipe({"attributes": [{"name": "g", "source": "caption", "caption": {"vocabulary": "perceived_gender"},
                                      "values": ["woman", "man"]}]})


def test_unknown_vocabulary_fails_before_any_work(tmp_path):
    from mmbalance.schemas.recipe import RecipeError

    corpus = write_shards(tmp_path / "c", {"a.parquet": pa.table({"uid": ["a"], "caption": ["x"]})})
    recipe = parse_recipe({"input": {"columns": {"caption": "caption"}},
                           "labels": [{"name": "job", "source": "caption", "caption": {"vocabulary": "jobs.yaml"}}]})
    with pytest.raises(RecipeError, match="job.caption.vocabulary: jobs.yaml: no such vocabulary file"):
        rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert not (tmp_path / "o" / "tags").exists()


def _planted_corpus(directory, centres: int, per_centre: int, dim: int, seed: int):
    """Points around ``centres`` unit centres (cos ~0.93 to their centre), with a skewed label."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    truth = np.repeat(np.arange(centres), per_centre)
    x = c[truth] + rng.normal(0, 0.4 / np.sqrt(dim), size=(len(truth), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    occupation = np.where(truth < centres // 2, "head", np.where(truth < centres - 1, "mid", "tail"))
    order = rng.permutation(len(truth))
    table = pa.table({
        "uid": [f"p{i}" for i in range(len(truth))],
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(x[order].reshape(-1).astype(np.float16)), dim),
        "truth": truth[order], "occupation": occupation[order],
    })
    n = table.num_rows
    return write_shards(directory, {f"s{i}.parquet": table.slice(i * n // 3, n // 3) for i in range(3)})


def test_clusters_recover_planted_structure_and_balance_it(tmp_path):
    corpus = _planted_corpus(tmp_path / "corpus", centres=12, per_centre=400, dim=32, seed=5)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "labels": [{"name": "occupation"}],
        "clusters": [{"name": "concept", "k": [8, 12, 16], "embedding": "image", "seed": 1}],
        "subclasses": [{"name": "occ_sub", "of": "occupation", "m0": 50}],
        "sample": {"size": 3000, "seed": 2},
        "balance": {"method": "waterfill", "by": "concept", "retention": 0.5},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    frame = _manifest_with_tags(tmp_path / "o")
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "truth", "occupation"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = frame.join(truth, on="uid")
    assert frame.height == 4800 and frame["tag.concept"].null_count() == 0
    assert result.report["fit"]["concept"]["sweep"]["best_k"] == 12  # the silhouette sweep finds the planted k
    assert adjusted_rand_score(frame["truth"].to_numpy(), frame["tag.concept"].to_numpy()) >= 0.9
    # SBCL: K_c = max(1, floor(n_c / max(min n, m0))) per occupation, ids unique across classes
    sizes = dict(frame.group_by("occupation").len().iter_rows())
    floor_size = max(min(sizes.values()), 50)
    expected = {occ: max(1, n // floor_size) for occ, n in sizes.items()}
    fit = result.report["fit"]["occ_sub"]
    assert fit["class_sizes_exact"] and fit["subclasses"] == sum(expected.values())
    per_class = dict(frame.group_by("occupation").agg(pl.col("tag.occ_sub").n_unique()).iter_rows())
    assert per_class == expected
    assert all(v.split("/")[0] == o for v, o in zip(frame["tag.occ_sub"], frame["occupation"]))
    # water-filling over clusters flattens the concept distribution at half the corpus
    assert result.report["weights"]["expected_rows"] == pytest.approx(0.5 * 4800, rel=1e-9)
    assert result.report["after_expected"]["concept_balance"]["concept"]["gini"] <= \
        result.report["before"]["concept_balance"]["concept"]["gini"]


def test_fit_sample_is_the_same_for_any_sharding(tmp_path):
    synth_corpus(tmp_path / "a", rows=4000, shards=2, seed=9, dim=16, images=False)
    # the same rows, resharded into 5 files
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "a").glob("*.parquet"))])
    write_shards(tmp_path / "b", {f"s{i}.parquet": table.slice(i * 800, 800) for i in range(5)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "clusters": [{"name": "c", "k": 5}], "sample": {"size": 500, "seed": 4},
    })
    uids = []
    for name in ("a", "b"):
        rebalance(str(tmp_path / name), str(tmp_path / f"o{name}"), recipe, LOCAL)
        uids.append(sorted(pq.read_table(tmp_path / f"o{name}" / "fit" / "sample.parquet").column("uid").to_pylist()))
    assert uids[0] == uids[1] and len(uids[0]) == 500


def test_hierarchical_clusters_and_balanced_sampling(tmp_path):
    corpus = _planted_corpus(tmp_path / "corpus", centres=12, per_centre=400, dim=32, seed=8)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "clusters": [{"name": "concept", "k": 12, "levels": [4], "seed": 3}],
        "sample": {"size": 3000, "seed": 2},
        "balance": {"method": "waterfill", "by": "concept", "size": 1200, "hierarchical": True},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    frame = _manifest_with_tags(tmp_path / "o")
    # every leaf sits under exactly one level-2 cluster
    assert frame.group_by("tag.concept").agg(pl.col("tag.concept_l2").n_unique())["tag.concept_l2"].max() == 1
    assert frame["tag.concept_l2"].n_unique() == 4
    # quotas: water-filling of 1200 over the 4 top clusters, then within each over its leaves
    top = frame.group_by("tag.concept_l2").agg(pl.len().alias("n"), pl.col("weight").sum().alias("w"))
    sizes = top["n"].to_numpy()
    from mmbalance.operators.solve.waterfill import waterfill_quotas

    expected = dict(zip(top["tag.concept_l2"], waterfill_quotas(sizes, 1200)))
    for value, w in zip(top["tag.concept_l2"], top["w"]):
        assert w == pytest.approx(expected[value], abs=1e-6)
    assert result.report["weights"]["expected_rows"] == pytest.approx(1200, abs=1e-6)
    assert result.report["solution"]["hierarchy"]["ks"] == [12, 4]


def test_caption_tags_feed_cap_and_m4(tmp_path):
    corpus = tmp_path / "corpus"
    synth_corpus(corpus, rows=6000, shards=2, seed=11, dim=8, images=False)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption"}},
        "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"},
                        "values": ["woman", "man"]}],
        "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
        "balance": [
            {"method": "cap", "by": "occupation", "cap": 400},
            {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
             "tolerance": {"representation": 0.01, "association": 0.02}, "retention": 0.8, "on_infeasible": "max_retention"},
        ],
        "report": {"leakage": False},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    frame = _manifest_with_tags(tmp_path / "o")
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "gender", "occupation"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = frame.join(truth, on="uid")
    # the synth captions name the person and the occupation: caption tags recover the planted columns
    assert (frame["tag.gender"].fill_null("-") == frame["gender"].fill_null("-")).mean() >= 0.99
    # the shipped vocabulary files "programmer" under its value "developer"
    expected = frame["occupation"].replace({"programmer": "developer"})
    assert (frame["tag.occupation"] == expected).mean() >= 0.99
    assert [s["method"] for s in result.report["solution"]["steps"]] == ["cap", "m4"]
    carrying = frame.filter(pl.col("tag.gender").is_not_null())
    W = carrying["weight"].sum()
    assert abs(carrying.filter(pl.col("tag.gender") == "woman")["weight"].sum() / W - 0.5) <= 0.01 + 1e-6
    assert result.report["audit"]["gender"]["sources"]["caption"]["tagged"] == carrying.height
