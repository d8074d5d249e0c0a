"""The rebalance run: wiring of the stages, resume, and the run record.

    discover + inspect (footers, schemas)      every shard checked before work starts
    scan        per shard   validate, tag, uid hashes        -> tags/, uids/, rejects/validate/
    dedup       per bucket  duplicate uids across shards     -> dedup/
    signatures  per shard   counts of first-occurrence rows  -> signatures/, rejects/dedup/
    solve       global      merged signatures -> solution    -> solve/solution.json
    weigh       per shard   weights, stochastic rounding     -> manifest/, after/
    report      global      metrics before and after         -> report.json, stats/

A per-shard stage skips every shard whose done marker exists, so a rerun after a crash redoes only
unfinished shards; all randomness is a pure function of (seed, shard id, row), so results match.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

import mmbalance
from mmbalance.operators import stats as stats_op
from mmbalance.operators.dedup import bucket_bounds
from mmbalance.operators.report import balance_of_sizes, build_report, family_leakage
from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.operators import tag as tag_op
from mmbalance.operators.zero_shot import summarise_audit
from mmbalance.pipeline import fit, plan, stages
from mmbalance.pipeline.executor import LocalExecutor, RayExecutor, ray_session
from mmbalance.pipeline.fingerprint import changed_shards, shard_fingerprints
from mmbalance.pipeline.progress import StageProgress
from mmbalance.pipeline.shards import check_output_location, discover_shards, expected_embedding_dim, inspect_shards
from mmbalance.pipeline.store import RunStore
from mmbalance.schemas.contract import InputError, tag_column
from mmbalance.schemas.recipe import Recipe

RUN_FORMAT = 2  # 2: content fingerprints per shard, done markers record their outputs
SAMPLE_METHODS = {"rnb"}  # balance methods that read the embedding sample


@dataclass
class RunOptions:
    executor: str | None = None  # overrides recipe.execution.executor
    address: str | None = None
    num_cpus: int | None = None
    overwrite: bool = False
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
            if any(store.exists("_done", st.name, f"{shard_id}.json") for st in plan.STAGES if st.unit == "shard"):
                return False
    return True


def _check_previous_run(store: RunStore, run: dict[str, Any], overwrite: bool, contents: dict[str, str],
                        current_ids: dict[str, str] | None = None) -> bool:
    """Refuse an OUT made from another recipe or input (unless ``overwrite``: then clear it). True
    when the run record must be rewritten: only shards that no finished unit depends on changed."""
    if not store.exists("run.json"):
        if store.exists() and store.list_files() and not overwrite:
            names = store.list_files()
            raise InputError(f"{store.uri}: output directory is not empty and holds no mmbalance run ({names[0]}, ...); "
                             "choose another --out or pass --overwrite")
        return False
    try:
        previous = store.read_json("run.json")
    except InputError:  # a torn run record: --overwrite starts over, otherwise the error names it
        if not overwrite:
            raise
        store.clear()
        return False
    keys = ("format", "recipe_fingerprint", "input_fingerprint", "embed_identity")
    same = all(previous.get(k) == run.get(k) for k in keys)
    if same:
        return False
    if not overwrite:
        changed = [k for k in ("recipe_fingerprint", "input_fingerprint", "embed_identity") if previous.get(k) != run.get(k)]
        if changed == ["input_fingerprint"] and store.exists("shards.json"):
            previous_shards = store.read_json("shards.json")
            moved = changed_shards(previous_shards, contents)
            if moved and _untouched(store, previous_shards, moved, current_ids or {}):
                return True
            if moved:
                more = f" (and {len(moved) - 1} more)" if len(moved) > 1 else ""
                raise InputError(
                    f"{moved[0]}{more}: input shard changed since the run in {store.uri} started (size, modification "
                    "time or footer differ); pass --overwrite to redo the run or choose another --out"
                )
        raise InputError(
            f"{store.uri}: holds a run with a different {' and '.join(c.split('_')[0] for c in changed) or 'format'}; "
            "pass --overwrite to replace it or choose another --out"
        )
    store.clear()
    return False


class KeptRows:
    """The kept rows' tags shard by shard (valid, first occurrence, embedded): for solvers that need
    every row, e.g. M4 with a per-row utility baseline. One shard in memory at a time."""

    def __init__(self, ctx: stages.RunContext, store: RunStore, shards, dups: dict[int, dict[str, list]], executor=None):
        self.ctx, self.store, self.shards, self.dups = ctx, store, shards, dups
        self.executor = executor or LocalExecutor()

    def blocks(self) -> "ShardBlocks":
        return ShardBlocks(self)

    def tables(self, columns: list[str]):
        for shard in self.shards:
            dup_rows = self.dups.get(shard.index, {}).get("rows", [])
            yield stages.kept_tags(self.ctx, self.store, shard.shard_id, dup_rows).select(columns)


class ShardBlocks:
    """M4 streaming blocks kept per shard under OUT/solve/stream/ and reduced by the run's executor:
    every dual evaluation is one map (a Ray task per shard) and a sum of per-signature vectors."""

    def __init__(self, rows: KeptRows):
        self.rows = rows
        self.calls = 0

    def _map(self, fn, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["shard_id"]: r for r in self.rows.executor.map(functools.partial(fn, self.rows.ctx), tasks)}

    def build(self, keys) -> tuple[int, float]:
        store = self.rows.store
        store.write_table("solve", "stream", "keys.parquet", table=keys.to_arrow())
        tasks = [{"shard_id": s.shard_id, "dup_rows": self.rows.dups.get(s.index, {}).get("rows", [])} for s in self.rows.shards]
        done = self._map(stages.stream_block_build, tasks)
        ids = [s.shard_id for s in self.rows.shards]
        return sum(done[i]["rows"] for i in ids), sum(done[i]["sum_u"] for i in ids)

    def build_rows(self, keys, spec) -> dict[str, float]:
        """Row blocks with projected embeddings (M4 embedding moments), one task per shard."""
        store = self.rows.store
        store.write_table("solve", "stream", "keys.parquet", table=keys.to_arrow())
        meta, arrays = spec.to_files()
        store.write_json("solve", "stream", "spec.json", obj=meta)
        store.write_bytes("solve", "stream", "spec.npz", data=stages.npz_bytes(**arrays))
        tasks = [{"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "rows_spec": True,
                  "dup_rows": self.rows.dups.get(s.index, {}).get("rows", [])} for s in self.rows.shards]
        done = self._map(stages.stream_block_build, tasks)
        ids = [s.shard_id for s in self.rows.shards]
        return {k: sum(done[i][k] for i in ids) for k in ("rows", "sum_u", "sum_omega", "sum_omega_u")}

    def iter_blocks(self):
        for shard in self.rows.shards:
            yield stages.read_npz(self.rows.store, "solve", "stream", f"{shard.shard_id}.npz")

    def reduce(self, kind: str, t, params: dict[str, Any]) -> np.ndarray:
        store = self.rows.store
        self.calls += 1
        t_file = None
        if t is not None:  # the dual shifts (or, with embedding moments, a dict of arrays)
            t_file = f"t-{self.calls:06d}.npz"
            payload = t if isinstance(t, dict) else {"t": np.asarray(t, np.float64)}
            store.write_bytes("solve", "stream", t_file, data=stages.npz_bytes(**payload))
        tasks = [{"shard_id": s.shard_id, "kind": kind, "t_file": t_file, "params": params, "call": self.calls}
                 for s in self.rows.shards]
        done = self._map(stages.stream_block_reduce, tasks)
        total = None
        for shard in self.rows.shards:  # a fixed order: the same sums on every rerun
            name = done[shard.shard_id]["part"]
            part = stages.read_npz(store, "solve", "stream", name)["part"]
            store.fs.delete_file(store.path("solve", "stream", name))
            total = part if total is None else total + part
        if t_file:
            store.fs.delete_file(store.path("solve", "stream", t_file))
        return total if total is not None else np.zeros((3 if kind == "aggregate" else 1, int(params["S"])))

    def close(self) -> None:
        store = self.rows.store
        if store.exists("solve", "stream"):
            store.fs.delete_dir(store.path("solve", "stream"))


class Rebalancer:
    def __init__(self, input_uri: str, out: str, recipe: Recipe, options: RunOptions | None = None):
        self.input_uri = input_uri
        self.recipe = recipe
        self.options = options or RunOptions()
        self.store = RunStore(out)
        self.stage_seconds: dict[str, float] = {}
        self.shard_fingerprints: dict[str, str] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def _run_stage(self, name: str, executor, ctx: stages.RunContext, tasks: list[dict[str, Any]], keys: list[str],
                   rows: list[int]) -> None:
        """Run the declared stage's tasks that are not verifiably done (marker readable, outputs
        intact, and the task's identity values, e.g. the solution digest, equal to the marker's);
        progress counts finished and skipped work."""
        declared = plan.stage(name)
        fn = functools.partial(getattr(stages, declared.function), ctx)
        identity, resources = declared.identity, declared.resources(self.recipe)
        defer = self.recipe.execution.on_unit_error == "defer"
        if defer:
            fn = functools.partial(stages.deferring, name, fn)
        start = time.perf_counter()
        if identity:
            tasks = [{**t, stages.IDENTITY: list(identity)} for t in tasks]
        expect = [{k: t[k] for k in identity} for t in tasks]
        done = self.store.verified_keys(name, keys, expect)
        todo = [{**t, stages.UNIT: k} for t, k in zip(tasks, keys) if k not in done]
        skipped_rows = sum(r for k, r in zip(keys, rows) if k in done)
        row_of = dict(zip(keys, rows))
        failed: list[dict[str, Any]] = []
        with StageProgress(name, total_units=len(tasks), total_rows=sum(rows), enabled=self.options.show_progress) as bar:
            bar.skip(len(tasks) - len(todo), skipped_rows)
            for summary in executor.map(fn, todo, sizes=[row_of[t[stages.UNIT]] for t in todo], **resources):
                if "_failed" in summary:
                    failed.append(summary)
                    continue
                bar.advance(1, row_of.get(summary[declared.key], 0))
                if self.options.on_progress:
                    self.options.on_progress(name, summary)
        self.stage_seconds[name] = round(time.perf_counter() - start, 3)
        if not failed and defer and self.store.exists("_failed", name):  # records of units since redone or renamed
            self.store.fs.delete_dir(self.store.path("_failed", name))
        if failed:
            failed.sort(key=lambda f: f["_failed"])
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise InputError(f"{failed[0]['reason']}{more}: {len(failed)} of {len(tasks)} {name} units failed, the others "
                             f"finished; recorded in {self.store.path('_failed', name)}; rerun to retry only those")

    def _summaries(self, stage: str, keys: list[str]) -> list[dict[str, Any]]:
        out = []
        for key in keys:
            summary = self.store.done_summary(stage, key)
            if summary is None:
                raise RuntimeError(f"stage {stage}: {key} did not finish")
            out.append(summary)
        return out

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        run, shards, layout_columns, dims = self._prepare()
        with self.store.lock():
            return self._locked_run(run, shards, layout_columns, dims)

    def _prepare(self):
        """Discovery and inspection (every footer and schema), content fingerprints, the run record."""
        recipe = self.recipe
        t0 = time.perf_counter()
        check_output_location(self.input_uri, self.store.uri)
        fs, shards = discover_shards(self.input_uri, recipe.input.extensions)
        inspected = inspect_shards(fs, shards, recipe)
        shards = [i.shard for i in inspected]
        layout_columns: list[str] = []
        for item in inspected:
            for c in item.layout.columns:
                if c not in layout_columns:
                    layout_columns.append(c)
        stages.row_tagger(recipe)  # compile caption lexicons now: a bad vocabulary fails before any work
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
        """What a run would do, from the declaration and what is verifiably done in OUT: per stage the
        units done and to do, the resources, and the expected output size (from the outputs of the
        units already done). Writes nothing."""
        recipe, store = self.recipe, self.store
        run, shards, _, _ = self._prepare()
        status = "new run"
        if store.exists("run.json"):
            try:
                previous = store.read_json("run.json")
                same = all(previous.get(k) == run.get(k) for k in ("format", "recipe_fingerprint", "input_fingerprint"))
                status = "resume" if same else None
                if not same and not self.options.overwrite:
                    _check_previous_run(store, run, False, self.shard_fingerprints, {s.relpath: s.shard_id for s in shards})
                    status = "resume (changed shards that no finished unit depends on are replaced)"
            except InputError as err:
                if not self.options.overwrite:
                    raise
                status = f"start over (--overwrite): {err}"
            if status is None:
                status = "start over (--overwrite)"
        fresh = not status.startswith("resume")
        ids, rows = [s.shard_id for s in shards], [s.num_rows for s in shards]
        summaries = {} if fresh else {k: store.done_summary("scan", k) for k in store.verified_keys("scan", ids)}
        valid = sum(v["rows_out"] for v in summaries.values()) if len(summaries) == len(ids) else None
        buckets = max(1, math.ceil((valid if valid is not None else run["input_rows"]) / recipe.execution.dedup_bucket_rows))
        solution = None if fresh else store.verified_summary("solve", "solution")
        digests = {}
        if solution is not None:
            digests["solution_digest"] = hashlib.sha256(
                json.dumps(store.read_json("solve", "solution.json"), sort_keys=True).encode()).hexdigest()[:16]
        fitted = None if fresh else store.verified_summary("fit", "models")
        if fitted is not None:
            digests["models_digest"] = fit.models_digest(store)
        out_rows = []
        for declared in plan.active_stages(recipe):
            entry: dict[str, Any] = {"stage": declared.name, "unit": declared.unit, "resources": declared.resources_text}
            if declared.unit == "global":
                done = {"fit": fitted is not None, "solve": solution is not None}.get(declared.name, False)
                entry.update(units=1, done=int(done), to_do=int(not done), rows_to_do=None,
                             note="" if declared.name in ("fit", "solve") else "rewritten by every run")
            else:
                keys = ids if declared.unit == "shard" else [f"{b:05d}-of-{buckets:05d}" for b in range(buckets)]
                unit_rows = rows if declared.unit == "shard" else [run["input_rows"] // buckets] * buckets
                if any(k not in digests for k in declared.identity):
                    done = set()  # what these units depend on is not there yet
                else:
                    expect = [{k: digests[k] for k in declared.identity}] * len(keys)
                    done = set() if fresh else store.verified_keys(declared.name, keys, expect)
                entry.update(units=len(keys), done=len(done), to_do=len(keys) - len(done),
                             rows_to_do=sum(r for k, r in zip(keys, unit_rows) if k not in done), note="")
                entry["expected_output_bytes"] = self._expected_bytes(declared.name, keys, unit_rows, done)
            out_rows.append(entry)
        return {"out": store.uri, "input": self.input_uri, "status": status, "shards": len(shards),
                "input_rows": run["input_rows"], "stages": out_rows}

    def _expected_bytes(self, stage: str, keys: list[str], unit_rows: list[int], done: set[str]) -> int | None:
        """The stage's output size: the recorded outputs of the units done, scaled by rows to the rest."""
        written = rows_done = 0
        for key, n in zip(keys, unit_rows):
            if key in done:
                marker = self.store.read_marker(stage, key) or {}
                written += sum(r["size"] for r in marker.get("_outputs", {}).values() if r)
                rows_done += n
        if not done:
            return None
        total_rows = sum(unit_rows)
        return int(written * total_rows / rows_done) if rows_done else written

    def _locked_run(self, run: dict[str, Any], shards, layout_columns: list[str], dims: dict[str, int]) -> RunResult:
        recipe, store = self.recipe, self.store
        if recipe.embed is not None:
            from mmbalance.schemas.embed import embedding_identity

            # loads the model once here: a bad tag, path or a missing torch fails before any work
            run["embed"] = stages.embed_record(recipe)
            run["embed_identity"] = embedding_identity(run["embed"])
        replaced = _check_previous_run(store, run, self.options.overwrite, self.shard_fingerprints,
                                       {s.relpath: s.shard_id for s in shards})
        store.sweep_temporaries()
        if replaced or not store.exists("run.json"):
            store.write_json("run.json", obj=run)
            store.write_json("shards.json", obj=[{**s.to_dict(), "fingerprint": self.shard_fingerprints[s.relpath]}
                                                 for s in shards])

        ctx = stages.RunContext(
            input_uri=self.input_uri,
            out=store.uri,
            recipe=recipe,
            source_columns=tuple(layout_columns),
            embedding_dims=tuple(sorted(dims.items())),
            sample_threshold=fit.sample_threshold(recipe, run["input_rows"]),
        )
        executor_kind = self.options.executor or recipe.execution.executor
        if executor_kind == "local":
            return self._stages(ctx, shards, LocalExecutor(), run)
        with ray_session(
            self.options.address or recipe.execution.address,
            self.options.num_cpus or recipe.execution.num_cpus,
            recipe.execution.object_store_memory_mb,
        ) as embedded:
            return self._stages(ctx, shards, RayExecutor(settle_workers=embedded), run)

    def _stages(self, ctx: stages.RunContext, shards, executor, run: dict[str, Any]) -> RunResult:
        recipe, store = self.recipe, self.store
        ids = [s.shard_id for s in shards]
        rows = [s.num_rows for s in shards]

        # scan
        scan_tasks = [{"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "num_rows": s.num_rows} for s in shards]
        self._run_stage("scan", executor, ctx, scan_tasks, ids, rows)
        scans = self._summaries("scan", ids)
        valid_rows = sum(s["rows_out"] for s in scans)

        # embed: open_clip on an actor pool (the model loads once per actor), or DataComp .npz
        if recipe.embed is not None:
            embed_tasks = [{**t, "embed_info": run["embed"]} for t in scan_tasks]
            self._run_stage("embed", executor, ctx, embed_tasks, ids, [s["rows_out"] for s in scans])

        # dedup: buckets sized so one bucket's hashes fit comfortably in a worker
        buckets = max(1, math.ceil(valid_rows / recipe.execution.dedup_bucket_rows))
        bucket_keys = [f"{b:05d}-of-{buckets:05d}" for b in range(buckets)]
        dedup_tasks = [
            {"bucket": b, "buckets": buckets, "lo": str(lo), "hi": str(hi), "shard_ids": ids}
            for b, (lo, hi) in enumerate(bucket_bounds(buckets))
        ]
        per_bucket_rows = [valid_rows // buckets] * buckets
        self._run_stage("dedup", executor, ctx, dedup_tasks, bucket_keys, per_bucket_rows)
        dups = self._duplicates(bucket_keys, shards)
        if self.options.stop_after == "dedup":
            n_dups = sum(len(d["rows"]) for d in dups.values())
            return RunResult(store.uri, {"scans": scans, "duplicates": n_dups}, dict(self.stage_seconds))

        # fit (global, on the sample) and assign (per shard): clusters and subclasses as labels
        fit_info = self._fit(ctx, executor, shards, dups, valid_rows) if recipe.needs_sample() else {}

        # signatures
        def with_dups(task: dict[str, Any], shard) -> dict[str, Any]:
            d = dups.get(shard.index, {"rows": [], "first_shard": [], "first_row": []})
            return {**task, "dup_rows": d["rows"], "dup_first_shard": d["first_shard"], "dup_first_row": d["first_row"]}

        sig_tasks = [with_dups({"shard_id": s.shard_id, "relpath": s.relpath}, s) for s in shards]
        self._run_stage("signatures", executor, ctx, sig_tasks, ids, rows)

        # solve (global, small)
        t = time.perf_counter()
        executor.settle()  # timed: waiting for workers to exit is the stage's cost
        before = stats_op.merge((store.read_table("signatures", f"{i}.parquet") for i in ids), ctx.tag_columns)
        store.write_table("signatures", "merged.parquet", table=before)
        vocab = self._vocabulary(before)
        entry_counts = {spec.name: self._merged_entries("entries", spec.name, ids) for spec in recipe.metadata_labels()}
        wants_sample = any(st.method in SAMPLE_METHODS for st in recipe.balance_steps())
        eval_paths = [st.eval_path for st in recipe.balance_steps() if getattr(st, "eval_path", None)]
        corpus = CorpusStats(recipe, before, vocab, total_rows=int(pa.compute.sum(before.column("count")).as_py() or 0),
                             sample=store.read_table("fit", "sample.parquet") if wants_sample and store.exists("fit", "sample.parquet") else None,
                             eval_sample=fit.read_eval_sample(eval_paths[0], recipe, dict(ctx.embedding_dims)) if eval_paths else None,
                             entry_counts=entry_counts,
                             hierarchies={c.name: store.read_json("models", f"{c.name}.json")["parents"]
                                          for c in recipe.clusters if c.levels},
                             rows=KeptRows(ctx, store, shards, dups, executor)
                             if recipe.input.columns.utility or recipe.embedding_moments() else None,
                             embedding_bases=fit.load_embedding_bases(store) if recipe.embedding_moments() else {})
        # a solution whose marker is missing or whose file changed is solved again (deterministic):
        # never a hand-edited or damaged solution applied to the unfinished shards only
        if store.verified_summary("solve", "solution") is None:
            try:
                solution = solve(corpus)
            except ValueError as err:  # solvers raise ValueError for what the recipe asks and the data can't give
                raise InputError(f"solve: {err}") from None
            store.take_written()
            store.write_json("solve", "solution.json", obj=solution.to_dict())
            store.mark_done("solve", "solution", {"rows_in": corpus.total_rows})
        solution_json = json.dumps(store.read_json("solve", "solution.json"), sort_keys=True)
        digest = hashlib.sha256(solution_json.encode()).hexdigest()[:16]
        self.stage_seconds["solve"] = round(time.perf_counter() - t, 3)

        # weigh
        weigh_tasks = [with_dups({"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "solution_digest": digest}, s)
                       for s in shards]
        self._run_stage("weigh", executor, ctx, weigh_tasks, ids, rows)

        # report
        t = time.perf_counter()
        executor.settle()  # timed: waiting for workers to exit is the stage's cost
        after = stats_op.merge((store.read_table("after", f"{i}.parquet") for i in ids), ctx.tag_columns)
        store.write_table("after", "merged.parquet", table=after)
        report = self._report(run, scans, before, after, vocab, json.loads(solution_json), dups)
        if fit_info:
            report["fit"] = fit_info
        if recipe.attributes and recipe.report.leakage and store.exists("fit", "sample.parquet"):
            from mmbalance.operators.leakage import leakage_report
            from mmbalance.operators.solve import solution_from_dict

            sample = store.read_table("fit", "sample.parquet")
            weights = solution_from_dict(json.loads(solution_json)).weights(sample)
            report["leakage"] = leakage_report(sample, recipe, vocab, weights, recipe.report.leakage_rows, recipe.sample.seed)
            if "constraint_families" in report:
                family_leakage(report["constraint_families"], report["leakage"])
        for spec in recipe.metadata_labels():  # concept balance over metadata entries, before and after
            before_sizes = entry_counts[spec.name]
            after_sizes = self._merged_entries("after_entries", spec.name, ids, size=len(before_sizes))
            for view, sizes in (("before", before_sizes), ("after_expected", after_sizes)):
                report[view]["concept_balance"][spec.name] = balance_of_sizes(sizes)
        derived = self._summaries("assign", ids) if recipe.needs_derive() else []
        audit = tag_op.merge_audits([s.get("audit") or {} for s in [*scans, *derived]])
        if audit:
            report["audit"] = {
                name: {**summarise_audit(item["counts"]), "sample_uids": {v: [u for _, u in items] for v, items in item["uids"].items()}}
                for name, item in audit.items() if "counts" in item
            }
        if coverage := tag_op.coverage_section(audit):  # caption sources: share tagged, untagged nouns
            report["coverage"] = coverage
        self.stage_seconds["report"] = round(time.perf_counter() - t, 3)

        # export: trainer formats from the manifest (rewritten whole each run: byte-identical)
        formats = [f for f in recipe.export.formats if f != "parquet"]
        if formats:
            from mmbalance.operators.export import export_run

            t = time.perf_counter()
            exported = export_run(store.uri, formats, recipe.export)
            report["export"] = {"dest": recipe.export.dest, "formats": formats, "mixture": exported.get("mixture")}
            self.stage_seconds["export"] = round(time.perf_counter() - t, 3)
        report["stage_seconds"] = dict(self.stage_seconds)
        report["stages"] = self._stage_stats(ids, bucket_keys)
        store.write_json("stats", "stages.json", obj=report["stages"])
        store.write_json("report.json", obj=report)
        if self.options.html_report and recipe.report.html:
            from mmbalance.operators.report_html import write_html_report

            write_html_report(store.uri)
        return RunResult(store.uri, report, dict(self.stage_seconds))

    def _fit(self, ctx: stages.RunContext, executor, shards, dups, valid_rows: int) -> dict[str, Any]:
        recipe, store = self.recipe, self.store
        t = time.perf_counter()
        executor.settle()  # timed: waiting for workers to exit is the stage's cost
        info = store.verified_summary("fit", "models")
        if info is None:
            store.take_written()
            n_dups = sum(len(d["rows"]) for d in dups.values())
            sample = fit.merge_sample(store, shards, dups, recipe.sample_size(), embedded=recipe.embed is not None)
            if sample is None:
                if recipe.needs_derive():
                    raise InputError("the fit sample is empty: no valid rows to cluster or tag")
                info = {"sample_rows": 0}
            else:
                sample, info = fit.fit_models(recipe, store, sample, shards, dups, valid_rows - n_dups, ctx=ctx)
                store.write_table("fit", "sample.parquet", table=sample)
            store.mark_done("fit", "models", info)
        self.stage_seconds["fit"] = round(time.perf_counter() - t, 3)
        if recipe.needs_derive():
            digest = fit.models_digest(store)
            tasks = [{"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "models_digest": digest} for s in shards]
            self._run_stage("assign", executor, ctx, tasks, [s.shard_id for s in shards], [s.num_rows for s in shards])
        return info

    def _merged_entries(self, directory: str, name: str, ids: list[str], size: int | None = None) -> np.ndarray:
        """Global per-entry counts (or weights) of a metadata label from its per-shard sparse tables."""
        from mmbalance.operators.stats import merge_sparse_counts

        tables = [self.store.read_table(directory, name, f"{i}.parquet") for i in ids]
        entries = size if size is not None else self._entry_count(name)
        return merge_sparse_counts(tables, entries)

    def _entry_count(self, name: str) -> int:
        from mmbalance.data import load_lines

        spec = next(lab for lab in self.recipe.metadata_labels() if lab.name == name)
        return len(load_lines(spec.metadata.entries))

    def _duplicates(self, bucket_keys: list[str], shards) -> dict[int, dict[str, list]]:
        """Duplicate rows per shard index. Memory grows with the number of duplicates, not rows."""
        by_shard: dict[int, dict[str, list]] = defaultdict(lambda: {"rows": [], "first_shard": [], "first_row": []})
        for key in bucket_keys:
            table = self.store.read_table("dedup", f"bucket-{key}.parquet")
            for s, r, fs, fr in zip(*(table.column(c).to_pylist() for c in ("shard_index", "row", "first_shard_index", "first_row"))):
                entry = by_shard[s]
                entry["rows"].append(r)
                entry["first_shard"].append(shards[fs].relpath)
                entry["first_row"].append(fr)
        return dict(by_shard)

    def _vocabulary(self, before: pa.Table) -> dict[str, list[str]]:
        vocab = {a.name: list(a.values) for a in self.recipe.attributes}
        declared = {lab.name: lab.values for lab in self.recipe.labels}
        for name in self.recipe.label_names():
            vocab[name] = list(declared[name]) if declared.get(name) else stats_op.vocabulary(before, tag_column(name))
        return vocab

    def _report(self, run, scans, before, after, vocab, solution, dups) -> dict[str, Any]:
        ids = [s["shard_id"] for s in scans]
        embeds = self._summaries("embed", ids) if self.recipe.embed is not None else []
        reasons: dict[str, int] = defaultdict(int)
        for s in [*scans, *embeds]:
            for k, v in s["reasons"].items():
                reasons[k] += v
        # duplicates counted where they were rejected: a copy the embed stage rejected counts once
        n_dups = sum(s["rejected"] for s in self._summaries("signatures", ids))
        if n_dups:
            reasons["duplicate uid"] += n_dups
        input_rows = sum(s["rows_in"] for s in scans)
        rejected = sum(s["rejected"] for s in scans) + sum(s["rejected"] for s in embeds) + n_dups
        manifest_rows = input_rows - rejected
        report = {
            "input": {"uri": run["input"], "shards": run["shards"], "fingerprint": run["input_fingerprint"]},
            "rows": {
                "input": input_rows,
                "manifest": manifest_rows,
                "rejected": rejected,
                "rejected_by_reason": dict(sorted(reasons.items())),
            },
            "method": self.recipe.balance_method(),
            "solution": solution.get("diagnostics", {}),
            "vocabulary_sizes": {k: len(v) for k, v in vocab.items()},
        }
        from mmbalance.operators.solve.row_solution import merge_embedding_sums

        sums = merge_embedding_sums([s.get("embedding_sums") for s in self._summaries("weigh", ids)])
        report.update(build_report(self.recipe, before, after, vocab, report["solution"], embedding_sums=sums))
        if report["weights"]["rows"] != manifest_rows:
            raise RuntimeError(f"row accounting broken: {manifest_rows} manifest rows, {report['weights']['rows']} weighed")
        return report

    def _stage_stats(self, ids: list[str], bucket_keys: list[str]) -> dict[str, Any]:
        """Per declared stage: units, the merged accounting (rows in/out/rejected, reasons), summed task
        seconds, wall seconds, and the per-unit distribution; global stages: wall seconds."""
        out: dict[str, Any] = {}
        if "inspect" in self.stage_seconds:
            out["inspect"] = {"wall_seconds": self.stage_seconds["inspect"]}
        for declared in plan.active_stages(self.recipe):
            if declared.unit == "global":
                if declared.name in self.stage_seconds:
                    out[declared.name] = {"wall_seconds": self.stage_seconds[declared.name]}
                continue
            keys = bucket_keys if declared.unit == "bucket" else ids
            out[declared.name] = plan.stage_statistics(declared.name, self._summaries(declared.name, keys),
                                                       self.stage_seconds.get(declared.name))
        return out


def rebalance(input_uri: str, out: str, recipe: Recipe, options: RunOptions | None = None) -> RunResult:
    return Rebalancer(input_uri, out, recipe, options).run()
