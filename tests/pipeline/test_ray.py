"""The Ray executor and the operators inside Ray Data, on one shared local Ray session."""

from __future__ import annotations

import pyarrow as pa
import pytest
from corpora import held_out_table

from mmbalance.pipeline.rebalance import RunOptions, rebalance

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_ray_executor_matches_local(ray_cluster, held_out_corpus, tmp_path, issue_recipe):
    rebalance(str(held_out_corpus), str(tmp_path / "local"), issue_recipe, RunOptions(executor="local", show_progress=False))
    result = rebalance(str(held_out_corpus), str(tmp_path / "ray"), issue_recipe, RunOptions(executor="ray", show_progress=False))
    assert ray_cluster.is_initialized()  # the run used the session, it did not stop it
    local = {p.name: p.read_bytes() for p in (tmp_path / "local" / "manifest").iterdir()}
    remote = {p.name: p.read_bytes() for p in (tmp_path / "ray" / "manifest").iterdir()}
    assert remote == local and len(remote) == 4
    assert result.report["rows"]["manifest"] == sum(3000 + 250 * i for i in range(4))


def test_job_entrypoint_runs_on_the_current_cluster(ray_cluster, held_out_corpus, tmp_path, capsys):
    from corpora import RECIPE_FROM_ISSUE

    from mmbalance.jobs.rebalance import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_FROM_ISSUE)
    assert main(["--recipe", str(recipe), "--input", str(held_out_corpus), "--out", str(tmp_path / "o")]) == 0
    assert "\"manifest\": 13500" in capsys.readouterr().out.replace("\n", "")
    assert main(["--recipe", str(recipe), "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "mmbalance job failed: " in capsys.readouterr().err


def test_m4_streaming_dual_evaluations_run_as_ray_tasks(ray_cluster, tmp_path):
    import numpy as np

    from corpora import write_shards
    from mmbalance.schemas.recipe import parse_recipe

    tables = {}
    for i in range(3):
        t = held_out_table(1500, 80 + i)
        tables[f"s{i}.parquet"] = t.append_column("score", pa.array(np.random.default_rng(i).gamma(2.0, 0.2, t.num_rows)))
    corpus = write_shards(tmp_path / "c", tables)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "utility": "score"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
                    "tolerance": {"association": 0.03}, "retention": 0.5, "max_weight": 2.0, "on_infeasible": "max_retention"},
        "report": {"leakage": False, "html": False},
    })
    manifests = {}
    for executor in ("local", "ray"):
        result = rebalance(str(corpus), str(tmp_path / executor), recipe, RunOptions(executor=executor, show_progress=False))
        assert "streaming" in result.report["solution"]["utility"]
        manifests[executor] = {p.name: p.read_bytes() for p in (tmp_path / executor / "manifest").iterdir()}
        assert not (tmp_path / executor / "solve" / "stream").exists()  # blocks are cleaned up after the solve
    assert manifests["ray"] == manifests["local"]


@pytest.mark.parametrize("sizes, slots, per_group, groups", [
    ([25_000] * 160, 2, 250_000, 16),  # small shards: ten to a Ray task
    ([250_000] * 16, 2, 250_000, 16),  # shards of the target size: one each
    ([25_000] * 3, 2, 250_000, 3),  # fewer tasks than slots: one each
    ([1] * 10, 4, 1, 10),  # no sizes known (M4 stream blocks): one each
    ([10, 10, 1_000_000, 10, 10], 1, 250_000, [[0, 1], [2], [3, 4]]),  # a big shard keeps its own task
])
def test_small_tasks_are_grouped_consecutively(sizes, slots, per_group, groups):
    from mmbalance.pipeline.executor import group_tasks

    got = group_tasks(sizes, slots, per_group)
    assert [i for g in got for i in g] == list(range(len(sizes)))  # every task once, in order
    assert (got == groups) if isinstance(groups, list) else (len(got) == groups and all(got))
