"""The stages of a rebalance run, in the order they run: the one list (adding a stage: one object in
a module here, one entry in ``STAGES``; docs/architecture.md, "Adding a stage"). The runner, the
resume and its damage cascade, ``--plan``, ``stats/stages.json``, ``mmbalance inspect``, the run
store's check of what it reads and the stage table in docs/architecture.md all read it.

Ray workers import this package to run any stage: what only some stages need (polars, scipy through
the solvers, faiss through the fit) is imported inside them, so a scan worker stays lean."""

from __future__ import annotations

import functools

from mmbalance.io.store import use_owners
from mmbalance.pipeline.stage import GlobalStage, Stage, UnitStage, task_fields
from mmbalance.pipeline.stages.dedup import Dedup
from mmbalance.pipeline.stages.embed import Embed
from mmbalance.pipeline.stages.fit import Assign, Fit
from mmbalance.pipeline.stages.report import Export, Html, Report
from mmbalance.pipeline.stages.scan import Scan
from mmbalance.pipeline.stages.signatures import Signatures
from mmbalance.pipeline.stages.solve import Solve
from mmbalance.pipeline.stages.weigh import Weigh
from mmbalance.schemas.recipe import Recipe

STAGES: tuple[Stage, ...] = (Scan(), Embed(), Dedup(), Fit(), Assign(), Signatures(), Solve(), Weigh(), Export(), Report(), Html())
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def active_stages(recipe: Recipe) -> list[Stage]:
    return [s for s in STAGES if s.active(recipe)]


def _check_declarations(stages: tuple[Stage, ...]) -> None:
    """What the declarations promise, checked when the package loads: every output written by one
    stage, keyed by the stage's unit; every read of an output after the stage that writes it; every
    identity field a field of the stage's task."""
    writer: dict[int, Stage] = {}
    for position, declared in enumerate(stages):
        placeholder = {"shard": "{shard}", "bucket": "{bucket}"}.get(declared.unit)
        for output in declared.writes:
            if id(output) in writer:
                raise RuntimeError(f"stage {declared.name}: {output.pattern} is also written by {writer[id(output)].name}")
            if placeholder and placeholder not in output.pattern or declared.unit == "global" and "{" in output.pattern:
                raise RuntimeError(f"stage {declared.name}: output {output.pattern} is not keyed by its {declared.unit}")
            writer[id(output)] = declared
        for read in declared.output_reads():
            if stages.index(writer.get(id(read.output), declared)) >= position:
                raise RuntimeError(f"stage {declared.name}: reads {read.output.pattern}, which no stage before it writes")
        if isinstance(declared, UnitStage):
            missing = set(declared.identity) - task_fields(declared.task_type)
            if missing:
                raise RuntimeError(f"stage {declared.name}: identity {sorted(missing)} not fields of {declared.task_type.__name__}")
        elif not isinstance(declared, GlobalStage):
            raise RuntimeError(f"stage {declared.name}: neither a UnitStage nor a GlobalStage")


_check_declarations(STAGES)


@functools.lru_cache(maxsize=1)
def _written() -> list[tuple[Stage, object]]:
    """Every declared output, literal paths first."""
    return sorted(((s, o) for s in STAGES for o in s.writes), key=lambda so: "{" in so[1].pattern)


def owner(relative: str) -> tuple[str, str] | None:
    """(stage, unit key) of the done marker that records ``relative`` (a path under OUT), or None.
    A literal path (signatures/merged.parquet) wins over a pattern it also matches (signatures/{shard})."""
    for declared, output in _written():
        found = output.regex().match(relative)
        if found:
            key = declared.done_key if isinstance(declared, GlobalStage) else found.groupdict().get("key")
            return (declared.name, key) if key else None
    return None


use_owners(owner)  # the run store checks a file against its marker; it learns which marker from here


def markdown_table() -> str:
    """The stage table of docs/architecture.md, generated from STAGES (a test keeps the doc in step)."""
    lines = ["| stage | unit | does | reads (under OUT) | writes (under OUT) | resources | redone when changed |",
             "|---|---|---|---|---|---|---|"]
    for s in STAGES:
        cells = [s.name, s.unit, s.summary, ", ".join(f"`{r.text()}`" for r in s.reads),
                 ", ".join(f"`{w.pattern}`" for w in s.writes), s.resources.text(), ", ".join(s.identity) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
