"""The stage declaration: docs generated from it, ``rebalance --plan`` read from it and from OUT."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE

from mmbalance.pipeline import stages
from mmbalance.pipeline.stage import GlobalStage, UnitStage
from mmbalance.pipeline.rebalance import Rebalancer, RunOptions, rebalance
from mmbalance.io.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[2]
LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def test_architecture_doc_shows_the_declared_stage_table():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"<!-- stages:begin -->\n(.*?)<!-- stages:end -->", doc, re.S)
    assert found, "docs/architecture.md lacks the generated stage table"
    assert found.group(1) == stages.markdown_table(), "regenerate the table with stages.markdown_table()"


def test_every_stage_is_one_object_that_runs_its_own_units():
    for declared in stages.STAGES:
        kind = GlobalStage if declared.unit == "global" else UnitStage
        assert isinstance(declared, kind), declared.name
        assert type(declared).run is not kind.run, f"{declared.name} does not define its work"
        assert declared.reads and declared.writes


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_FROM_ISSUE)
    return load_recipe(path)


def by_stage(planned: dict) -> dict[str, dict]:
    return {row["stage"]: row for row in planned["stages"]}


def test_plan_of_a_new_run_writes_nothing_and_lists_every_unit(held_out_corpus, tmp_path, recipe):
    out = tmp_path / "o"
    planned = Rebalancer(str(held_out_corpus), str(out), recipe, LOCAL).plan()
    assert not out.exists()
    rows = by_stage(planned)
    assert planned["status"] == "new run" and planned["input_rows"] == sum(3000 + 250 * i for i in range(4))
    assert [r["stage"] for r in planned["stages"]] == [s.name for s in stages.active_stages(recipe)]
    assert rows["scan"] == {**rows["scan"], "units": 4, "done": 0, "to_do": 4, "rows_to_do": planned["input_rows"],
                            "expected_output_bytes": None}


def test_plan_after_a_lost_manifest_file_says_one_weigh_unit_and_its_size(held_out_corpus, tmp_path, recipe):
    out = tmp_path / "o"
    rebalance(str(held_out_corpus), str(out), recipe, LOCAL)
    victim = sorted((out / "manifest").iterdir())[0]
    lost_rows = pq.read_metadata(victim).num_rows
    victim.unlink()
    rows = by_stage(Rebalancer(str(held_out_corpus), str(out), recipe, LOCAL).plan())
    assert rows["weigh"]["done"] == 3 and rows["weigh"]["to_do"] == 1 and rows["weigh"]["rows_to_do"] == lost_rows
    assert all(rows[s]["to_do"] == 0 for s in ("scan", "dedup", "signatures", "solve"))
    # the estimate scales the done units' recorded outputs: after the rerun it is within 10% of the real size
    expected = rows["weigh"]["expected_output_bytes"]
    rebalance(str(held_out_corpus), str(out), recipe, LOCAL)
    real = sum((out / d / f).stat().st_size for d in ("manifest", "after") for f in os.listdir(out / d) if f != "merged.parquet")
    assert abs(expected - real) / real < 0.1


def test_cli_plan_prints_the_table_and_runs_nothing(held_out_corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE_FROM_ISSUE)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "mmbalance.cli", "rebalance", str(held_out_corpus), "--out", str(out),
                           "--recipe", str(recipe), "--plan"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(f"new run; 4 shards, {sum(3000 + 250 * i for i in range(4)):,} rows from {held_out_corpus}")
    scan = next(line for line in lines if line.startswith("scan "))
    assert scan.split()[:5] == ["scan", "shard", "4", "0", "4"]


@pytest.mark.parametrize("module, must_not_load", [
    ("mmbalance.pipeline.fit", "mmbalance.pipeline.stages"),  # fit reads rows through pipeline/rows.py
    ("mmbalance.pipeline.stages", "mmbalance.operators.cluster"),  # a scan worker never loads faiss
    ("mmbalance.pipeline.stages", "faiss"),
    ("mmbalance.operators.hierarchy", "mmbalance.operators.solve.waterfill"),  # quotas live below both
])
def test_layers_do_not_reach_upwards(module, must_not_load):
    code = f"import sys, {module}; print({must_not_load!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
