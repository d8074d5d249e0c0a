"""A stage is one object: the registry checks its declarations when it loads, a unit that writes what
its stage does not declare fails, and the run store learns which marker records a file from the
stages without importing them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from mmbalance.pipeline import resume, stages
from mmbalance.pipeline.stage import GlobalStage, Output, ShardTask, UnitStage
from mmbalance.pipeline.stages.scan import TAGS

NEW = Output("new/{shard}.parquet")


@dataclass(frozen=True)
class NewTask(ShardTask):
    threshold: float


class NewStage(UnitStage):
    name = "new"
    summary = "a stage added after scan"
    reads = (TAGS.one,)
    writes = (NEW,)
    identity = ("threshold",)
    task_type = NewTask


def registry_with(*extra) -> tuple:
    return (*stages.STAGES, *extra)


def test_a_new_stage_is_one_object_the_registry_accepts_and_the_cascade_follows(monkeypatch):
    stages._check_declarations(registry_with(NewStage()))
    monkeypatch.setattr(stages, "STAGES", registry_with(NewStage()))
    monkeypatch.setattr(stages, "BY_NAME", {s.name: s for s in stages.STAGES})
    assert ("new", True) in [(r.name, same) for r, same in resume.readers_of("scan")]  # the same shard's tags
    assert resume.readers_of("new") == []


@pytest.mark.parametrize("broken, message", [
    (type("Twice", (NewStage,), {"writes": (TAGS,)}), "is also written by scan"),
    (type("Unkeyed", (NewStage,), {"writes": (Output("new/all.parquet"),)}), "is not keyed by its shard"),
    (type("Early", (NewStage,), {"reads": (Output("nobody/{shard}.parquet").one,)}), "which no stage before it writes"),
    (type("Unknown", (NewStage,), {"identity": ("threshold", "seed")}), "identity ['seed'] not fields of NewTask"),
    (type("Keyed", (GlobalStage,), {"name": "g", "summary": "", "reads": (), "writes": (Output("g/{shard}.json"),)}),
     "is not keyed by its global"),
])
def test_the_registry_refuses_declarations_that_do_not_hold(broken, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        stages._check_declarations(registry_with(broken()))


def test_a_unit_may_write_only_what_its_stage_declares():
    stage = stages.stage("weigh")
    stage.check_writes({"manifest/s1.parquet": {}, "after_entries/lab/s1.parquet": {}}, "s1")
    with pytest.raises(RuntimeError, match="wrote tags/s1.parquet, which the stage does not declare"):
        stage.check_writes({"tags/s1.parquet": {}}, "s1")
    with pytest.raises(RuntimeError, match="unit s1 wrote manifest/s2.parquet"):  # another unit's file
        stage.check_writes({"manifest/s2.parquet": {}}, "s1")


def test_the_store_imports_nothing_above_io_and_learns_owners_from_the_stages():
    code = ("import sys, mmbalance.io.store as store; "
            "print(sorted(m for m in sys.modules if m.startswith(('mmbalance.pipeline', 'mmbalance.operators')))); "
            "print(store.owner_of('manifest/s1.parquet')); "
            "import mmbalance.pipeline.stages; "
            "print(store.owner_of('manifest/s1.parquet'), store.owner_of('signatures/merged.parquet'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "None", "('weigh', 's1') ('solve', 'solution')"]
