"""The rebalance run: discovery and inspection of the input, the run record and what an earlier run
in OUT holds, the lock, the executor; then the stages (pipeline/runner.py, pipeline/stages/).

    discover + inspect (footers, schemas)      every shard checked before work starts
    scan        per shard   validate, tag, uid hashes        -> tags/, uids/, rejects/validate/
    embed       per shard   open_clip or .npz embeddings     -> embeddings/, rejects/embed/
    dedup       per bucket  duplicate uids across shards     -> dedup/
    fit         global      the fit sample, models           -> fit/, models/
    assign      per shard   cluster and zero-shot tags       -> assign/
    signatures  per shard   counts of first-occurrence rows  -> signatures/, rejects/dedup/
    solve       global      merged signatures -> solution    -> solve/solution.json
    weigh       per shard   weights, stochastic rounding     -> manifest/, after/
    export      global      trainer formats                  -> export/
    report      global      metrics before and after         -> report.json, stats/
    html        global      the report as a page             -> report.html
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

import mmbalance
from mmbalance.io.storage import configure_storage, ensure_bucket
from mmbalance.io.store import RunStore
from mmbalance.operators import tag as tag_op
from mmbalance.pipeline import resume
from mmbalance.pipeline.sampling import sample_threshold
from mmbalance.pipeline.executor import LocalExecutor, RayExecutor, ray_session
from mmbalance.pipeline.fingerprint import shard_fingerprints
from mmbalance.pipeline.plan import plan_run
from mmbalance.pipeline.runner import Runner, RunState
from mmbalance.pipeline.shards import (check_local_out, check_output_location, discover_shards, effective_recipe,
                                      expected_embedding_dim, inspect_shards)
from mmbalance.pipeline.stage import RunContext
from mmbalance.pipeline.stages import STAGES, active_stages
from mmbalance.pipeline.stages.embed import embed_record
from mmbalance.pipeline.stages.scan import row_tagger
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import Recipe

RUN_FORMAT = 3  # 2: content fingerprints per shard, done markers record their outputs; 3: whole-file checksums
# what makes a run directory the same run (run.json): another value refuses it, or --update/--overwrite
RUN_IDENTITY = ("format", "recipe_fingerprint", "input_fingerprint", "embed_identity")


@dataclass
class RunOptions:
    executor: str | None = None  # overrides recipe.execution.executor
    address: str | None = None
    num_cpus: int | None = None
    overwrite: bool = False
    update: bool = False  # the input grew or changed: redo only the units the added, changed or removed shards affect
    show_progress: bool = True
    html_report: bool = True  # OUT/report.html at the end of every run (matplotlib, ~2 s)
    stop_after: str | None = None  # "dedup": validation only, no solve or manifest
    # test hook: called with the stage name after each finished unit of work
    on_progress: Callable[[str, dict[str, Any]], None] | None = None


@dataclass
class RunResult:
    out: str
    report: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import importlib.metadata

    import numpy
    import polars

    try:  # read without importing: the local executor runs where Ray is not installed
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = "absent"
    return {
        "mmbalance": mmbalance.__version__,
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "numpy": numpy.__version__,
        "polars": polars.__version__,
        "ray": ray_version,
    }


def _input_fingerprint(shards, contents: dict[str, str]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.relpath}\0{s.size}\0{s.num_rows}\0{contents[s.relpath]}\n".encode())
    return h.hexdigest()[:16]


def _untouched(store: RunStore, previous_shards: list[dict], relpaths: list[str], current_ids: dict[str, str]) -> bool:
    """True when no unit of work has finished for any of these shards (under their old or new id) and
    no global stage has started: replacing them then changes nothing already computed (e.g. a shard
    whose scan failed on unreadable data, repaired before the rerun)."""
    old_ids = {s["relpath"]: s["shard_id"] for s in previous_shards}
    if store.list_files("_done", "dedup"):
        return False
    for rel in relpaths:
        for shard_id in {old_ids.get(rel), current_ids.get(rel)} - {None}:
            if any(store.exists("_done", st.name, f"{shard_id}.json") for st in STAGES if st.unit == "shard"):
                return False
    return True


@dataclass
class PreviousRun:
    """What a run directory holds, against this run: ``rewrite`` the run record (only shards no
    finished unit depends on changed, or an update), ``changes`` for ``--update``."""

    rewrite: bool = False
    changes: resume.InputChanges | None = None
    previous_shards: list[dict[str, Any]] = field(default_factory=list)


def _changed_input_error(store: RunStore, changes: resume.InputChanges) -> InputError:
    rel, kind = changes.first()
    more = f" (and {changes.count() - 1} more: {changes.summary()})" if changes.count() > 1 else ""
    what = {"added": "input shard added", "removed": "input shard removed",
            "changed": "input shard changed"}[kind] + f" since the run in {store.uri} started"
    if kind == "changed":
        what += " (size, modification time or footer differ)"
    return InputError(f"{rel}{more}: {what}; pass --update to redo only what the changed shards affect, "
                      "--overwrite to redo the run, or choose another --out")


def _check_previous_run(store: RunStore, run: dict[str, Any], overwrite: bool, contents: dict[str, str],
                        current_ids: dict[str, str] | None = None, update: bool = False) -> PreviousRun:
    """Refuse an OUT made from another recipe or input (unless ``overwrite``: then clear it; or
    ``update`` for another input under the same recipe)."""
    if not store.exists("run.json"):
        if store.exists() and store.list_files() and not overwrite:
            names = store.list_files()
            raise InputError(f"{store.uri}: output directory is not empty and holds no mmbalance run ({names[0]}, ...); "
                             "choose another --out or pass --overwrite")
        return PreviousRun()
    try:
        previous = store.read_json("run.json")
    except InputError:  # a torn run record: --overwrite starts over, otherwise the error names it
        if not overwrite:
            raise
        store.clear()
        return PreviousRun()
    if all(previous.get(k) == run.get(k) for k in RUN_IDENTITY):
        return PreviousRun()
    if not overwrite:
        changed = [k for k in RUN_IDENTITY[1:] if previous.get(k) != run.get(k)]
        if changed == ["input_fingerprint"] and previous.get("format") == run.get("format") and store.exists("shards.json"):
            previous_shards = store.read_json("shards.json")
            changes = resume.input_changes(previous_shards, contents)
            if update:
                return PreviousRun(True, changes, previous_shards)
            moved = changes.added + changes.changed + changes.removed
            if moved and _untouched(store, previous_shards, moved, current_ids or {}):
                return PreviousRun(True)
            if moved:
                raise _changed_input_error(store, changes)
        what = " and ".join(c.split("_")[0] for c in changed) or "format"
        hint = " (--update keeps the recipe and changes only the input)" if update and changed != ["input_fingerprint"] else ""
        raise InputError(f"{store.uri}: holds a run with a different {what}{hint}; "
                         "pass --overwrite to replace it or choose another --out")
    store.clear()
    return PreviousRun()


class Rebalancer:
    def __init__(self, input_uri: str, out: str, recipe: Recipe, options: RunOptions | None = None):
        configure_storage(recipe.storage)
        self.input_uri = input_uri
        self.recipe = recipe
        self.options = options or RunOptions()
        self.store = RunStore(out)
        self.stage_seconds: dict[str, float] = {}
        self.shard_fingerprints: dict[str, str] = {}

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        run, shards, layout_columns, dims = self._prepare()
        ensure_bucket(self.store.uri)
        if isinstance(self.store.fs, pafs.LocalFileSystem):
            check_local_out(self.store.uri, self.store.root, create=True)
        with self.store.lock():
            return self._locked_run(run, shards, layout_columns, dims)

    def _prepare(self):
        """Discovery and inspection (every footer and schema), content fingerprints, the run record."""
        recipe = self.recipe
        t0 = time.perf_counter()
        check_output_location(self.input_uri, self.store.uri)
        fs, shards = discover_shards(self.input_uri, recipe.input.extensions, recipe.input.format)
        recipe = self.recipe = effective_recipe(fs, shards, recipe)
        inspected = inspect_shards(fs, shards, recipe)
        shards = [i.shard for i in inspected]
        layout_columns: list[str] = []
        for item in inspected:
            for c in item.layout.columns:
                if c not in layout_columns:
                    layout_columns.append(c)
        row_tagger(recipe)  # compile caption lexicons now: a bad vocabulary fails before any work
        tag_op.check_vocabularies(recipe, captions=False)  # and the zero-shot ones, read otherwise only at the fit
        dims = {}
        for role in ("image_embedding", "text_embedding"):
            column = getattr(recipe.input.columns, role)
            if column:
                dims[column] = expected_embedding_dim(fs, inspected, column, recipe)
        contents = self.shard_fingerprints = shard_fingerprints(fs, shards)
        self.stage_seconds["inspect"] = round(time.perf_counter() - t0, 3)

        run = {
            "format": RUN_FORMAT,
            "input": self.input_uri,
            "recipe": recipe.model_dump(mode="json"),
            "recipe_fingerprint": recipe.fingerprint(),
            "input_fingerprint": _input_fingerprint(shards, contents),
            "shards": len(shards),
            "input_rows": sum(s.num_rows for s in shards),
            "seeds": {"export": recipe.export.seed},
            "embedding_dims": dims,
            "versions": _versions(),
        }
        return run, shards, layout_columns, dims

    def plan(self) -> dict[str, Any]:
        """What a run would do (see pipeline/plan.py). Writes nothing."""
        run, shards, layout_columns, dims = self._prepare()
        status, previous = self._plan_status(run, shards)
        state = self._state(run, shards, layout_columns, dims)
        return plan_run(state, status, previous, fresh=not status.startswith(("resume", "update")))

    def _plan_status(self, run: dict[str, Any], shards) -> tuple[str, PreviousRun]:
        store, status, previous = self.store, "new run", PreviousRun()
        if store.exists("run.json"):
            try:
                recorded = store.read_json("run.json")
                # the plan loads no model: it takes the embedding identity to be the recorded one
                as_run = {**run, "embed_identity": recorded.get("embed_identity")}
                same = all(recorded.get(k) == as_run.get(k) for k in RUN_IDENTITY)
                status = "resume" if same else "start over (--overwrite)"
                if not same and not self.options.overwrite:
                    previous = _check_previous_run(store, as_run, False, self.shard_fingerprints,
                                                   {s.relpath: s.shard_id for s in shards}, self.options.update)
                    status = (f"update ({previous.changes.summary()} shards: rescanned, with what depends on them)"
                              if previous.changes else "resume (changed shards that no finished unit depends on are replaced)")
            except InputError as err:
                if not self.options.overwrite:
                    raise
                status = f"start over (--overwrite): {err}"
        if store.locked_by_another():
            status = (f"another mmbalance run holds the lock on {store.uri} and is writing to it now; what follows is "
                      f"its progress so far (it would {status.split(' (')[0]})")
        return status, previous

    def _locked_run(self, run: dict[str, Any], shards, layout_columns: list[str], dims: dict[str, int]) -> RunResult:
        recipe, store = self.recipe, self.store
        if recipe.embed is not None:
            from mmbalance.schemas.embed import embedding_identity

            # loads the model once here: a bad tag, path or a missing torch fails before any work
            run["embed"] = embed_record(recipe, check_only=self.options.stop_after == "dedup")
            run["embed_identity"] = embedding_identity(run["embed"])
        previous = _check_previous_run(store, run, self.options.overwrite, self.shard_fingerprints,
                                       {s.relpath: s.shard_id for s in shards}, self.options.update)
        store.sweep_temporaries()
        if previous.changes:  # before the new run record: a run killed here redoes the same update
            resume.apply_update(store, recipe, previous.previous_shards, shards, previous.changes)
        if previous.rewrite:  # another corpus size: the finished scans' fit-sample candidates follow it
            resume.narrow_samples(store, [s.shard_id for s in shards], sample_threshold(recipe, run["input_rows"]))
        if previous.rewrite or not store.exists("run.json"):
            store.write_json("run.json", obj=run)
            store.write_json("shards.json", obj=[{**s.to_dict(), "fingerprint": self.shard_fingerprints[s.relpath]}
                                                 for s in shards])

        executor_kind = self.options.executor or recipe.execution.executor
        if executor_kind == "local":
            return self._stages(self._state(run, shards, layout_columns, dims, LocalExecutor()))
        with ray_session(
            self.options.address or recipe.execution.address,
            self.options.num_cpus or recipe.execution.num_cpus,
            recipe.execution.object_store_memory_mb,
        ) as embedded:
            return self._stages(self._state(run, shards, layout_columns, dims, RayExecutor(pool=embedded)))

    def _state(self, run: dict[str, Any], shards, layout_columns: list[str], dims: dict[str, int], executor=None) -> RunState:
        ctx = RunContext(
            input_uri=self.input_uri,
            out=self.store.uri,
            recipe=self.recipe,
            source_columns=tuple(layout_columns),
            embedding_dims=tuple(sorted(dims.items())),
            sample_threshold=sample_threshold(self.recipe, run["input_rows"]),
        )
        return RunState(self.recipe, self.store, ctx, shards, run, active_stages(self.recipe), self.options, executor,
                        stage_seconds=dict(self.stage_seconds))

    def _stages(self, state: RunState) -> RunResult:
        Runner(state).run(stop_after=self.options.stop_after)
        if self.options.stop_after:  # validation: what the run would reject up to there
            return RunResult(state.store.uri, validation_counts(state), dict(state.stage_seconds))
        report = state.results["report"]
        return RunResult(state.store.uri, report, dict(report["stage_seconds"]))


def validation_counts(state: RunState) -> dict[str, Any]:
    """The scan's and the embed stage's unit summaries and the duplicates, counted as the run counts
    them: a copy the embed stage rejects is rejected once."""
    from mmbalance.pipeline.rows import embed_rejected_rows
    from mmbalance.pipeline.stages.dedup import duplicates

    dups = duplicates(state)
    n_dups = sum(len(set(dups[s.index]["rows"]) - set(embed_rejected_rows(state.ctx, state.store, s.shard_id).tolist()))
                 for s in state.shards if s.index in dups)
    embeds = state.summaries("embed") if state.is_active("embed") else []
    return {"scans": state.summaries("scan"), "embeds": embeds, "duplicates": n_dups}


def rebalance(input_uri: str, out: str, recipe: Recipe, options: RunOptions | None = None) -> RunResult:
    return Rebalancer(input_uri, out, recipe, options).run()
