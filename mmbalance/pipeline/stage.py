"""What a stage is: one object that owns its name, unit, when it is active, its typed tasks, the
work of a unit (or of the whole run), the task fields a change of which redoes a unit, what it
reads and writes under OUT, and the resources a unit asks for. One marker protocol for every
stage: a unit (a shard, a uid-hash bucket, or the run for a global stage) counts as done while its
done marker reads, its identity values equal the current ones and every output it recorded still
matches; its marker is written last. Adding a stage: docs/architecture.md ("Adding a stage").

Every per-unit summary carries one accounting schema (``ACCOUNTING``): ``rows_in``, ``rows_out``,
``rejected``, ``reasons`` (rejected rows by reason) and ``seconds``; the marker refuses a summary
without them, so a renamed key fails loudly instead of reporting 0. Stage statistics merge by
summing (like datatrove's mergeable ``MetricStats``) plus per-unit distributions.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mmbalance.io.storage import configure_storage
from mmbalance.io.store import RunStore, UnitCheck
from mmbalance.schemas.contract import InputError, add_reasons, tag_column
from mmbalance.schemas.recipe import Recipe

if TYPE_CHECKING:
    from mmbalance.pipeline.runner import RunState
    from mmbalance.pipeline.shards import Shard

ACCOUNTING = ("rows_in", "rows_out", "rejected", "reasons", "seconds")
Unit = Literal["shard", "bucket", "global"]


@dataclass(frozen=True)
class RunContext:
    """Everything a worker needs, small and picklable."""

    input_uri: str
    out: str
    recipe: Recipe
    source_columns: tuple[str, ...]
    embedding_dims: tuple[tuple[str, int], ...]
    # rows whose sample priority is at most this join the fit sample; None: no sample needed
    sample_threshold: int | None = None

    @property
    def tag_columns(self) -> list[str]:
        return [tag_column(n) for n in [a.name for a in self.recipe.attributes] + self.recipe.label_names()]


# -- what a stage reads and writes: declarations the registry checks and the resume derives from ---


@dataclass(frozen=True)
class Output:
    """Files a stage writes under OUT: ``{shard}`` / ``{bucket}`` the unit's key, ``{label}`` a
    metadata label, ``*`` any name. Other stages read it through ``one`` or ``every``."""

    pattern: str

    @property
    def one(self) -> "Read":
        """The same unit's file (a shard stage reading a shard stage's output for its own shard)."""
        return Read(self, every=False)

    @property
    def every(self) -> "Read":
        """Every unit's file."""
        return Read(self, every=True)

    def regex(self) -> re.Pattern:
        """Matches a relative path of this output; group ``key`` is the unit's key."""
        return _regex(self.pattern)


@dataclass(frozen=True)
class Read:
    output: Output
    every: bool

    def text(self) -> str:
        return re.sub(r"\{(shard|bucket)\}", "*", self.output.pattern) if self.every else self.output.pattern


@dataclass(frozen=True)
class Source:
    """What a stage reads that no stage writes: the input shards, the done markers."""

    name: str

    def text(self) -> str:
        return self.name


@dataclass(frozen=True)
class OneOf:
    """One of several reads, by recipe (the input shard's embedding columns or the embed stage's)."""

    reads: tuple[Read | Source, ...]

    def text(self) -> str:
        return " or ".join(r.text() for r in self.reads)


INPUT_SHARD = Source("input shard")
DONE_MARKERS = Source("_done/*")


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    out = ""
    for part in re.split(r"(\{shard\}|\{bucket\}|\{label\}|\*)", pattern):
        if part in ("{shard}", "{bucket}"):
            out += "(?P<key>[^/]+)"
        elif part in ("{label}", "*"):
            out += "[^/]+"
        else:
            out += re.escape(part)
    return re.compile(out + "$")


@dataclass(frozen=True)
class Resources:
    """What one unit asks the executor for: a task with one CPU, a pool of long-lived actors sized by
    a recipe section (its ``actors``, ``num_cpus``, ``num_gpus``; the model loads once per actor),
    or the driver (a global stage)."""

    kind: Literal["task", "actor_pool", "driver"] = "task"
    section: str | None = None  # the recipe section an actor pool is sized by
    note: str = ""

    def text(self) -> str:
        base = {"task": "1 CPU per task", "driver": "the driver",
                "actor_pool": f"{self.section}.actors actors, {self.section}.num_cpus / num_gpus each"}[self.kind]
        return f"{base} ({self.note})" if self.note else base

    def executor_options(self, recipe: Recipe) -> dict[str, Any]:
        """Keyword arguments of ``executor.map`` (a section without a model to load runs as tasks)."""
        if self.kind != "actor_pool":
            return {}
        spec = getattr(recipe, self.section)
        if spec is None or not spec.uses_model:
            return {}
        return {"actors": spec.actors, "num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}


# -- the stages ---------------------------------------------------------------------------------------


class Stage:
    """A stage's declaration and behaviour. Subclass ``UnitStage`` or ``GlobalStage``."""

    name: ClassVar[str]
    unit: ClassVar[Unit]
    summary: ClassVar[str]  # one line: what a unit does
    reads: ClassVar[tuple[Read | Source | OneOf, ...]]
    writes: ClassVar[tuple[Output, ...]]
    identity: ClassVar[tuple[str, ...]] = ()  # task fields a done marker records; a change redoes the unit
    resources: ClassVar[Resources] = Resources()

    def active(self, recipe: Recipe) -> bool:
        """Does the recipe need this stage?"""
        return True

    def output_reads(self) -> list[Read]:
        """The reads of other stages' outputs (each alternative of a OneOf)."""
        flat = (r for entry in self.reads for r in (entry.reads if isinstance(entry, OneOf) else (entry,)))
        return [r for r in flat if isinstance(r, Read)]

    def check_writes(self, outputs: dict[str, Any], key: str) -> None:
        """A unit wrote only what its stage declares (under its own key): a write the declarations
        miss would escape the resume's damage cascade, so it fails here."""
        for relative in outputs:
            found = next((m for m in (o.regex().match(relative) for o in self.writes) if m), None)
            if found is None or found.groupdict().get("key", key) != key:
                raise RuntimeError(f"stage {self.name}: unit {key} wrote {relative}, which the stage does not declare")


@dataclass(frozen=True)
class ShardTask:
    """One unit of a per-shard stage."""

    shard: Shard
    rows: int  # rows the unit handles: progress, and grouping small units into one Ray task

    @property
    def key(self) -> str:
        return self.shard.shard_id


@dataclass(frozen=True)
class UnitFailure:
    """A unit's bad input, recorded instead of stopping the stage (execution.on_unit_error: defer)."""

    key: str
    reason: str


class UnitStage(Stage):
    """A stage of independent units (one per shard or per bucket), run on the executor."""

    unit: ClassVar[Literal["shard", "bucket"]] = "shard"
    task_type: ClassVar[type] = ShardTask
    key_field: ClassVar[str] = "shard_id"  # the summary field that names the unit

    def tasks(self, state: RunState) -> list:
        """The stage's units as typed tasks (their identity values included), built from ``keys``,
        ``unit_rows`` and ``identity_values``: what ``--plan`` counts without building them."""
        identity = self.identity_values(state)
        return [self.task_type(shard=s, rows=rows, **identity, **self.task_fields(state, s))
                for s, rows in zip(state.shards, self.unit_rows(state))]

    def keys(self, state: RunState) -> list[str]:
        return [s.shard_id for s in state.shards]

    def unit_rows(self, state: RunState) -> list[int]:
        """Rows each unit handles (progress and grouping; --plan's rows to do)."""
        return [s.num_rows for s in state.shards]

    def identity_values(self, state: RunState) -> dict[str, Any]:
        """The current values of the identity fields (None where not known yet: --plan before the
        stage they come from is done)."""
        return {}

    def task_fields(self, state: RunState, shard: Shard) -> dict[str, Any]:
        """A shard's task fields beyond the shard, its rows and the identity values."""
        return {}

    def run(self, ctx: RunContext, task, store: RunStore) -> dict[str, Any]:
        """One unit's work (in a worker): writes its outputs through ``store``, returns its summary."""
        raise NotImplementedError

    def plan_checks(self, state: RunState) -> dict[str, UnitCheck]:
        """--plan: every unit checked as the run would (outputs read in full). While an identity value
        is not known yet (what it comes from is to be redone) every unit is "changed", except one whose
        outputs are damaged: it stays "damaged", so the plan names every damaged file at once."""
        keys, identity = self.keys(state), self.identity_values(state)
        if any(v is None for v in identity.values()):
            found = state.store.check_units(self.name, keys)
            return {k: c if c.status == "damaged" else UnitCheck("changed") for k, c in found.items()}
        return state.store.check_units(self.name, keys, [identity] * len(keys))

    def function(self, ctx: RunContext, defer: bool = False):
        """The picklable function an executor maps over this stage's tasks."""
        return functools.partial(run_unit, self, ctx, defer)


class GlobalStage(Stage):
    """A stage with one unit, the whole run, done in the driver."""

    unit: ClassVar[Literal["global"]] = "global"
    resources: ClassVar[Resources] = Resources("driver")
    done_key: ClassVar[str | None] = None  # its marker: _done/<name>/<done_key>.json; None: no marker
    rerun: ClassVar[bool] = False  # redone by every run (its marker, if any, deleted first, written last)

    def run(self, state: RunState) -> Any:
        """The stage's work; returns its result, which later stages read from ``state.results``."""
        raise NotImplementedError

    def marker_summary(self, result: Any) -> dict[str, Any]:
        """What the done marker records of the result (and what a resumed run reads back as it)."""
        return result


# -- the marker protocol of a unit -----------------------------------------------------------------


def check_accounting(stage_name: str, summary: dict[str, Any]) -> None:
    """A unit's summary must carry the accounting schema: a renamed key fails here, not as a silent 0."""
    missing = [k for k in ACCOUNTING if k != "seconds" and k not in summary]
    if missing:
        raise RuntimeError(f"stage {stage_name}: unit summary lacks {', '.join(missing)} (the accounting schema)")


def run_unit(stage: UnitStage, ctx: RunContext, defer: bool, task) -> dict[str, Any] | UnitFailure:
    """One unit, in a worker: its work, then its done marker (written last): the summary with the
    unit's key, seconds and identity values, and the record of every file it wrote. With ``defer``,
    bad input (an unreadable shard) is recorded in OUT/_failed/<stage>/<key>.json and returned as a
    failure instead of stopping the stage."""
    configure_storage(ctx.recipe.storage)  # a worker reaches the run's object store as the driver does
    started = time.perf_counter()
    store = RunStore(ctx.out)
    failed = ("_failed", stage.name, f"{task.key}.json")
    try:
        summary = stage.run(ctx, task, store)
    except InputError as err:
        if not defer:
            raise
        reason = str(err).splitlines()[0]
        rows = task.shard.num_rows if isinstance(task, ShardTask) else None
        RunStore(ctx.out).write_json(*failed, obj={"unit": task.key, "reason": reason, "rows": rows})
        return UnitFailure(task.key, reason)
    summary[stage.key_field] = task.key
    check_accounting(stage.name, summary)
    for name in stage.identity:
        summary[name] = getattr(task, name)
    summary["seconds"] = round(time.perf_counter() - started, 4)
    outputs = store.take_written()
    stage.check_writes(outputs, task.key)
    store.mark_done(stage.name, task.key, summary, outputs)
    if defer and store.exists(*failed):  # retried and done: no longer failed
        store.fs.delete_file(store.path(*failed))
    return summary


def identity_of(stage: UnitStage, task) -> dict[str, Any]:
    return {name: getattr(task, name) for name in stage.identity}


def task_fields(task_type: type) -> set[str]:
    return {f.name for f in dataclasses.fields(task_type)}


# -- stage statistics ---------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.quantile(np.asarray(values, np.float64), q)) if values else 0.0


def stage_statistics(key: str, summaries: list[dict[str, Any]], wall_seconds: float | None,
                     slowest: int = 5) -> dict[str, Any]:
    """One stage's merged accounting and its per-unit distribution (``key``: the summary field that
    names a unit)."""
    seconds = [float(s.get("seconds", 0.0)) for s in summaries]
    rates = [s["rows_in"] / t for s, t in zip(summaries, seconds) if t > 0]
    reasons = add_reasons({}, *(s.get("reasons") for s in summaries))
    order = sorted(range(len(summaries)), key=lambda i: (-seconds[i], str(summaries[i].get(key))))
    return {
        "units": len(summaries),
        "rows_in": int(sum(s["rows_in"] for s in summaries)),
        "rows_out": int(sum(s["rows_out"] for s in summaries)),
        "rejected": int(sum(s["rejected"] for s in summaries)),
        "reasons": dict(sorted(reasons.items())),
        "task_seconds": round(sum(seconds), 3),
        "wall_seconds": wall_seconds,
        "seconds_per_unit": {"p50": round(_quantile(seconds, 0.5), 4), "p95": round(_quantile(seconds, 0.95), 4),
                             "max": round(max(seconds, default=0.0), 4)},
        "rows_per_second_per_unit": {"p50": round(_quantile(rates, 0.5), 1), "p5": round(_quantile(rates, 0.05), 1)},
        "slowest": [{"unit": summaries[i].get(key), "seconds": round(seconds[i], 4), "rows_in": int(summaries[i]["rows_in"])}
                    for i in order[:slowest]],
    }
