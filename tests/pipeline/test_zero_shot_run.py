"""Zero-shot tags inside a run: prompts encoded once by the model's text tower, rows scored from
their embeddings after the scan, combined with scan-time sources, audited."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import TINY_SIGLIP, tiny_open_clip_dir, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import RecipeError, parse_recipe

pytest.importorskip("open_clip")


def _class_matrix(model_dir) -> np.ndarray:
    from mmbalance.data import load_vocabulary
    from mmbalance.operators.embed.model import load_model
    from mmbalance.operators.zero_shot import vocabulary_embeddings
    from mmbalance.schemas.embed import EmbedSpec

    vocab = dataclasses.replace(load_vocabulary("perceived_gender"), values=("woman", "man"))
    bundle = load_model(EmbedSpec(model=f"local-dir:{model_dir}", pretrained="random"))
    return vocabulary_embeddings(vocab, bundle.encode_texts).matrix  # woman, man, none


def test_zero_shot_recovers_planted_classes_and_combines_with_a_column(tmp_path):
    model_dir = tiny_open_clip_dir(tmp_path / "tiny")
    classes = _class_matrix(model_dir)
    rng = np.random.default_rng(0)
    n = 900
    truth = rng.integers(0, 3, n)  # 0 woman, 1 man, 2 none
    gaps = [np.linalg.norm(classes[i] - classes[j]) for i in range(3) for j in range(i + 1, 3)]
    # noise well inside the gaps between class directions (a random tower puts them close together)
    emb = classes[truth] + rng.normal(0, 0.1 * min(gaps) / np.sqrt(classes.shape[1]), (n, classes.shape[1]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    given = np.where(rng.random(n) < 0.5, np.array(["woman", "man", None])[truth], None)
    table = pa.table({
        "uid": [f"z{i}" for i in range(n)],
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float32)), classes.shape[1]),
        "given": pa.array(given.tolist(), pa.string()),
    })
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 450), "b.parquet": table.slice(450)})
    zero_shot = {"vocabulary": "perceived_gender", "sides": ["image"], "temperature": 1e-4, "threshold": 0.0,
                 "model": f"local-dir:{model_dir}", "pretrained": "random"}
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "attributes": [
            {"name": "gender", "source": "zero_shot", "zero_shot": zero_shot, "values": ["woman", "man"]},
            {"name": "both", "source": ["column", "zero_shot"], "column": "given", "zero_shot": zero_shot,
             "values": ["woman", "man"], "combine": "all"},
        ],
        "sample": {"size": 300},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    assigned = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "o" / "assign").glob("*.parquet"))])
    tags = assigned.column("tag.gender").to_pylist()
    expected = [["woman", "man", None][t] for t in truth]
    assert np.mean([a == b for a, b in zip(tags, expected)]) >= 0.95
    # all: a tag only where the given column and zero-shot both tag and agree
    both = assigned.column("tag.both").to_pylist()
    fired = assigned.column("fired.both").to_numpy()
    for b, g, z, f in zip(both, given, tags, fired):
        assert b == (g if (g is not None and g == z) else None)
        assert f == (g is not None) * 1 + (z is not None) * 2
    audit = result.report["audit"]["gender"]
    assert audit["rows"] == n and audit["sources"]["zero_shot_image"]["tagged"] == sum(t is not None for t in tags)
    assert result.report["audit"]["both"]["agreement"]["column|zero_shot_image"]["agreement"] >= 0.95
    assert "fit" in result.report and result.report["fit"]["gender"]["classes"] == ["woman", "man", "none"]


def test_zero_shot_needs_a_text_tower():
    with pytest.raises(RecipeError, match="needs a text tower"):
        parse_recipe({"input": {"columns": {"image_embedding": "e"}},
                      "attributes": [{"name": "g", "source": "zero_shot", "values": ["woman", "man"],
                                      "zero_shot": {"vocabulary": "perceived_gender"}}]})




def test_siglip_zero_shot_run_uses_the_sigmoid_head_and_vocabulary_values(tmp_path):
    import json

    model_dir = tmp_path / "siglip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(TINY_SIGLIP))
    classes = _class_matrix(model_dir)
    rng = np.random.default_rng(1)
    n = 600
    truth = rng.integers(0, 3, n)
    gaps = [np.linalg.norm(classes[i] - classes[j]) for i in range(3) for j in range(i + 1, 3)]
    emb = classes[truth] + rng.normal(0, 0.1 * min(gaps) / np.sqrt(classes.shape[1]), (n, classes.shape[1]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table({"uid": [f"s{i}" for i in range(n)],
                      "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1).astype(np.float32)), classes.shape[1])})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 300), "b.parquet": table.slice(300)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        # no values: the vocabulary's (woman, man)
        "attributes": [{"name": "gender", "source": "zero_shot", "zero_shot": {
            "vocabulary": "perceived_gender", "threshold": 0.0, "model": f"local-dir:{model_dir}", "pretrained": "random"}}],
        "sample": {"size": 200},
    })
    assert recipe.attributes[0].values == ["woman", "man"]
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    fit_info = result.report["fit"]["gender"]
    # the model's head as initialised (logit_scale log(1/0.07), logit_bias -10): sigmoid scoring
    assert fit_info["scoring"] == "sigmoid" and fit_info["logit_bias"] == -10.0
    assert fit_info["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assigned = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "o" / "assign").glob("*.parquet"))])
    expected = [["woman", "man", None][t] for t in truth]
    assert np.mean([a == b for a, b in zip(assigned.column("tag.gender").to_pylist(), expected)]) >= 0.95
