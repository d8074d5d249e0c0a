"""The run: a loop over the active stages, each run by the one marker protocol (pipeline/stage.py).

A per-unit stage skips every unit that is verifiably done (marker readable, outputs intact, identity
values equal), so a rerun after a crash redoes only unfinished units; all randomness is a pure
function of (seed, shard id, row), so results match. A global stage runs in the driver unless its
marker says it is done (or it is rewritten by every run). Damaged outputs are redone with everything
that read them (pipeline/resume.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from mmbalance.io.store import RunStore, UnitCheck
from mmbalance.pipeline import resume
from mmbalance.pipeline.executor import release_memory
from mmbalance.pipeline.progress import StageProgress
from mmbalance.pipeline.stage import GlobalStage, RunContext, Stage, UnitFailure, UnitStage, identity_of
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import Recipe


@dataclass
class RunState:
    """What the stages of one run share in the driver: the run's inputs, the results of the global
    stages so far, and values derived once (``memo``: the duplicates, the merged signatures, the
    digests). ``checks`` set: the state of ``--plan``, which runs nothing and counts as done only
    what the checks found done."""

    recipe: Recipe
    store: RunStore
    ctx: RunContext
    shards: list  # pipeline.shards.Shard, sorted by relative path
    run: dict[str, Any]  # the run record (run.json)
    stages: list[Stage]  # the active ones, in order
    options: Any = None  # rebalance.RunOptions
    executor: Any = None
    checks: dict[str, dict[str, UnitCheck]] | None = None
    results: dict[str, Any] = field(default_factory=dict)  # a global stage's result by stage name
    stage_seconds: dict[str, float] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    stage_started: float = 0.0
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def forget(self, key: str) -> None:
        self._memo.pop(key, None)

    def clear_memo(self) -> None:
        self._memo.clear()

    def active(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def is_active(self, name: str) -> bool:
        return self.active(name) is not None

    def finished(self, name: str) -> bool:
        """Has the stage finished (in this run; for --plan: found verifiably done)?"""
        if self.checks is None:
            return name in self.completed
        declared = self.active(name)
        found = self.checks.get(name, {})
        return bool(found) and all(c.status == "done" for c in found.values()) and (
            not isinstance(declared, UnitStage) or set(found) == set(declared.keys(self)))

    def summaries(self, name: str) -> list[dict[str, Any]] | None:
        """The unit summaries of a finished per-unit stage, in unit order (--plan: None unless done)."""
        if self.checks is not None and not self.finished(name):
            return None

        def read() -> list[dict[str, Any]]:
            out = []
            for key in self.active(name).keys(self):
                summary = self.store.done_summary(name, key)
                if summary is None:
                    raise RuntimeError(f"stage {name}: {key} did not finish")
                out.append(summary)
            return out

        return self.memo(_summaries_key(name), read)

    def valid_rows(self) -> int:
        """Rows the scan kept (--plan before the scans are done: every input row)."""
        scans = self.summaries("scan")
        return sum(s["rows_out"] for s in scans) if scans is not None else self.run["input_rows"]

    def seconds_until_now(self, name: str) -> dict[str, float]:
        """Every stage's wall seconds so far, the running one's up to now."""
        return {**self.stage_seconds, name: round(time.perf_counter() - self.stage_started, 3)}


def _summaries_key(name: str) -> str:
    return f"summaries:{name}"


class Runner:
    def __init__(self, state: RunState):
        self.state = state
        self.options = state.options

    def run(self, stop_after: str | None = None) -> None:
        stages = self.state.stages
        for i, declared in enumerate(stages):
            self.state.stage_started = time.perf_counter()
            if isinstance(declared, UnitStage):
                self.run_units(declared)
            else:
                if not any(isinstance(s, UnitStage) for s in stages[i:]):
                    self.state.executor.release()  # timed: ending the idle workers is the stage's cost
                self.run_global(declared)
            self.state.completed.add(declared.name)
            if declared.name == stop_after:
                return

    def run_units(self, declared: UnitStage) -> None:
        """Run the stage's tasks that are not verifiably done; progress counts finished and skipped work."""
        state, store = self.state, self.state.store
        start = state.stage_started
        state.forget(_summaries_key(declared.name))
        tasks = declared.tasks(state)
        checks = store.check_units(declared.name, [t.key for t in tasks], [identity_of(declared, t) for t in tasks])
        self.repair(resume.damages(declared.name, checks))
        done = {k for k, c in checks.items() if c.status == "done"}
        todo = [t for t in tasks if t.key not in done]
        row_of = {t.key: t.rows for t in tasks}
        defer = state.recipe.execution.on_unit_error == "defer"
        failed: list[UnitFailure] = []
        fn = declared.function(state.ctx, defer)
        with StageProgress(declared.name, total_units=len(tasks), total_rows=sum(row_of.values()),
                           enabled=self.options.show_progress) as bar:
            bar.skip(len(tasks) - len(todo), sum(row_of[k] for k in done))
            for result in state.executor.map(fn, todo, sizes=[t.rows for t in todo],
                                             **declared.resources.executor_options(state.recipe)):
                if isinstance(result, UnitFailure):
                    failed.append(result)
                    continue
                bar.advance(1, row_of.get(result[declared.key_field], 0))
                if self.options.on_progress:
                    self.options.on_progress(declared.name, result)
        state.stage_seconds[declared.name] = round(time.perf_counter() - start, 3)
        if not failed and defer and store.exists("_failed", declared.name):  # records of units since redone or renamed
            store.fs.delete_dir(store.path("_failed", declared.name))
        if failed:
            failed.sort(key=lambda f: f.key)
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise InputError(f"{failed[0].reason}{more}: {len(failed)} of {len(tasks)} {declared.name} units failed, the others "
                             f"finished; recorded in {store.uri_of('_failed', declared.name)}; rerun to retry only those")

    def run_global(self, declared: GlobalStage) -> None:
        """The stage's one unit, in the driver: skipped while its marker says done (its damaged outputs
        repaired like a unit's); a stage rewritten by every run deletes its marker first and writes it
        last. Its result (or, when skipped, its marker's summary) is what later stages read."""
        state, store = self.state, self.state.store
        start = state.stage_started
        key = declared.done_key
        if key and not declared.rerun:
            check = store.check_unit(declared.name, key)
            self.repair(resume.damages(declared.name, {key: check}))
            if check.status == "done":
                state.results[declared.name] = store.done_summary(declared.name, key)
                state.stage_seconds[declared.name] = round(time.perf_counter() - start, 3)
                return
        if key:
            store.forget(declared.name, key)
        store.take_written()
        result = declared.run(state)
        if key:
            outputs = store.take_written()
            declared.check_writes(outputs, key)
            store.mark_done(declared.name, key, declared.marker_summary(result), outputs)
        state.results[declared.name] = result
        release_memory()  # the stage's working set (the fit's sample and its copies) back to the OS
        state.stage_seconds[declared.name] = round(time.perf_counter() - start, 3)

    def repair(self, damaged: list[resume.Damage]) -> None:
        """Damaged outputs: their units and every unit downstream of them are redone (markers deleted)."""
        if not damaged:
            return
        closure = resume.invalidate(self.state.store, self.state.recipe, damaged)
        if self.options.show_progress:
            from rich.console import Console

            follow = ", ".join(f"{st} {'all' if resume.ALL in ks else len(ks)}" for st, ks in closure.items())
            for d in damaged:
                Console(stderr=True, soft_wrap=True, highlight=False).print(
                    f"[yellow]{escape(d.line(self.state.store))}[/yellow]: redone" + (f" with what read it ({follow})" if follow else ""))
