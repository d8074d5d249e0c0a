"""The embed stage's Ray actor pool under ``mmbalance evaluate`` gives what the in-process path gives:
the same embeddings, the same evaluate.json."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from corpora import TINY_OPEN_CLIP
from evaluate_sets import eval_table, model_dir, write_eval_set

pytest.importorskip("open_clip")

from mmbalance.pipeline.evaluate import EvaluateOptions, evaluate  # noqa: E402
from mmbalance.schemas.evaluate import load_eval_recipe  # noqa: E402

pytestmark = pytest.mark.ray


def test_ray_actor_pool_matches_in_process(ray_cluster, tmp_path):
    model = model_dir(tmp_path / "tiny", TINY_OPEN_CLIP)
    path, recipe_path = write_eval_set(tmp_path / "set", rows=40, model_dir=model, samples=20)
    (tmp_path / "set" / "more").mkdir()  # two shards: two units of the embed stage
    pq.write_table(eval_table(20, seed=9), tmp_path / "set" / "more" / "b.parquet")
    path.rename(tmp_path / "set" / "more" / "a.parquet")
    source = str(tmp_path / "set" / "more")
    recipe = load_eval_recipe(recipe_path)
    local = evaluate(source, str(tmp_path / "local"), recipe, EvaluateOptions(executor="local", html=False))
    ray = evaluate(source, str(tmp_path / "ray"), recipe, EvaluateOptions(executor="ray", html=False))
    assert ray_cluster.is_initialized()  # the session's cluster was used, not stopped
    assert json.loads((tmp_path / "ray" / "stats.json").read_text())["executor"] == "ray"
    assert ray == local and local["eval"] == {**local["eval"], "shards": 2, "images": 60}
    for name in sorted(p.name for p in (tmp_path / "local" / "embeddings").glob("*.parquet")):
        assert pq.read_table(tmp_path / "ray" / "embeddings" / name).equals(pq.read_table(tmp_path / "local" / "embeddings" / name))
