"""solve (global): the merged signatures (and, for the methods that need them, the fit sample, an
evaluation sample, the kept rows) -> the solution. M4 with a per-row utility or embedding moments
reads every kept row: as row blocks kept per shard under OUT/solve/stream/, each dual evaluation one
map over them on the run's executor (``ShardBlocks``, the block set ``operators.solve`` drives)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmbalance.io.store import RunStore
from mmbalance.io.storage import configure_storage
from mmbalance.pipeline.rows import kept_projections, kept_tags, npz_bytes, read_npz
from mmbalance.pipeline.stage import GlobalStage, Output, Resources, RunContext
from mmbalance.pipeline.stages.dedup import of_shard
from mmbalance.pipeline.stages.fit import FIT_SAMPLE
from mmbalance.pipeline.stages.signatures import SIGNATURES, entry_counts, merged, vocabulary
from mmbalance.schemas.contract import InputError

MERGED_SIGNATURES = Output("signatures/merged.parquet")
SOLUTION = Output("solve/solution.json")
SAMPLE_METHODS = {"rnb"}  # balance methods that read the embedding sample


class Solve(GlobalStage):
    name = "solve"
    summary = "merged signatures -> solution (cap | waterfill | reweigh | rake | m4 | rnb, composable)"
    reads = (SIGNATURES.every, FIT_SAMPLE.every)
    writes = (MERGED_SIGNATURES, SOLUTION)
    resources = Resources("driver", note="m4 utility: a task per shard per evaluation")
    done_key = "solution"

    def run(self, state) -> dict[str, Any]:
        """Solved again whenever its marker is missing or its file changed (deterministic): never a
        hand-edited or damaged solution applied to the unfinished shards only."""
        import pyarrow.compute as pc

        from mmbalance.operators.solve import CorpusStats, solve
        from mmbalance.pipeline import fit as fitting

        recipe, store = state.recipe, state.store
        before = merged(state)
        steps = recipe.balance_steps()
        wants_sample = any(st.method in SAMPLE_METHODS for st in steps)
        eval_paths = [st.eval_path for st in steps if getattr(st, "eval_path", None)]
        corpus = CorpusStats(recipe, before, vocabulary(state), total_rows=int(pc.sum(before.column("count")).as_py() or 0),
                             sample=store.read_table("fit", "sample.parquet") if wants_sample and store.exists("fit", "sample.parquet") else None,
                             eval_sample=fitting.read_eval_sample(eval_paths[0], recipe, dict(state.ctx.embedding_dims)) if eval_paths else None,
                             entry_counts=entry_counts(state),
                             hierarchies={c.name: store.read_json("models", f"{c.name}.json")["parents"]
                                          for c in recipe.clusters if c.levels},
                             rows=KeptRows(state) if recipe.input.columns.utility or recipe.embedding_moments() else None,
                             embedding_bases=fitting.load_embedding_bases(store) if recipe.embedding_moments() else {})
        try:
            solution = solve(corpus)
        except ValueError as err:  # solvers raise ValueError for what the recipe asks and the data can't give
            raise InputError(f"solve: {err}") from None
        store.write_table("signatures", "merged.parquet", table=before)
        store.write_json("solve", "solution.json", obj=solution.to_dict())
        return {"rows_in": corpus.total_rows}


def solution(state) -> dict[str, Any]:
    """solve/solution.json, read once per run."""
    return state.memo("solution", lambda: state.store.read_json("solve", "solution.json"))


def solution_digest(state) -> str | None:
    """The digest of the solution (weigh's identity); None until the solve is done."""
    if not state.finished("solve"):
        return None
    return state.memo("solution_digest", lambda: hashlib.sha256(json.dumps(solution(state), sort_keys=True).encode()).hexdigest()[:16])


# -- the kept rows as M4's row blocks, reduced by the run's executor -----------------------------------


class KeptRows:
    """The kept rows' tags shard by shard (valid, first occurrence, embedded): for solvers that need
    every row, e.g. M4 with a per-row utility baseline. One shard in memory at a time."""

    def __init__(self, state):
        self.ctx, self.shards, self.executor = state.ctx, state.shards, state.executor
        self.dup_rows = {s.shard_id: of_shard(state, s)["rows"] for s in state.shards}
        self.store = RunStore(state.ctx.out)  # its own: the blocks are scratch, never a unit's outputs

    def blocks(self) -> "ShardBlocks":
        return ShardBlocks(self)

    def tables(self, columns: list[str]):
        for shard in self.shards:
            yield kept_tags(self.ctx, self.store, shard.shard_id, self.dup_rows[shard.shard_id]).select(columns)


@dataclass(frozen=True)
class BlockBuild:
    shard: Any  # pipeline.shards.Shard
    dup_rows: list[int]
    rows_spec: bool  # M4 embedding moments: the block carries projected embeddings


@dataclass(frozen=True)
class BlockReduce:
    shard_id: str
    kind: str
    t_file: str | None
    params: dict[str, Any]
    call: int


class ShardBlocks:
    """M4 streaming blocks kept per shard under OUT/solve/stream/ and reduced by the run's executor:
    every dual evaluation is one map (a Ray task per shard) and a sum of per-signature vectors."""

    def __init__(self, rows: KeptRows):
        self.rows = rows
        self.calls = 0

    def _map(self, fn, tasks) -> dict[str, dict[str, Any]]:
        import functools

        return {r["shard_id"]: r for r in self.rows.executor.map(functools.partial(fn, self.rows.ctx), tasks)}

    def _build(self, rows_spec: bool) -> list[dict[str, Any]]:
        tasks = [BlockBuild(s, self.rows.dup_rows[s.shard_id], rows_spec) for s in self.rows.shards]
        done = self._map(build_block, tasks)
        return [done[s.shard_id] for s in self.rows.shards]

    def build(self, keys) -> tuple[int, float]:
        self.rows.store.write_table("solve", "stream", "keys.parquet", table=keys.to_arrow())
        done = self._build(rows_spec=False)
        return sum(d["rows"] for d in done), sum(d["sum_u"] for d in done)

    def build_rows(self, keys, spec) -> dict[str, float]:
        """Row blocks with projected embeddings (M4 embedding moments), one task per shard."""
        store = self.rows.store
        store.write_table("solve", "stream", "keys.parquet", table=keys.to_arrow())
        meta, arrays = spec.to_files()
        store.write_json("solve", "stream", "spec.json", obj=meta)
        store.write_bytes("solve", "stream", "spec.npz", data=npz_bytes(**arrays))
        done = self._build(rows_spec=True)
        return {k: sum(d[k] for d in done) for k in ("rows", "sum_u", "sum_omega", "sum_omega_u")}

    def iter_blocks(self):
        for shard in self.rows.shards:
            yield read_npz(self.rows.store, "solve", "stream", f"{shard.shard_id}.npz")

    def reduce(self, kind: str, t, params: dict[str, Any]) -> np.ndarray:
        store = self.rows.store
        self.calls += 1
        t_file = None
        if t is not None:  # the dual shifts (or, with embedding moments, a dict of arrays)
            t_file = f"t-{self.calls:06d}.npz"
            payload = t if isinstance(t, dict) else {"t": np.asarray(t, np.float64)}
            store.write_bytes("solve", "stream", t_file, data=npz_bytes(**payload))
        done = self._map(reduce_block, [BlockReduce(s.shard_id, kind, t_file, params, self.calls) for s in self.rows.shards])
        total = None
        for shard in self.rows.shards:  # a fixed order: the same sums on every rerun
            name = done[shard.shard_id]["part"]
            part = read_npz(store, "solve", "stream", name)["part"]
            store.fs.delete_file(store.path("solve", "stream", name))
            total = part if total is None else total + part
        if t_file:
            store.fs.delete_file(store.path("solve", "stream", t_file))
        store.take_written()  # scratch: nobody records it
        return total if total is not None else np.zeros((3 if kind == "aggregate" else 1, int(params["S"])))

    def close(self) -> None:
        store = self.rows.store
        if store.exists("solve", "stream"):
            store.fs.delete_dir(store.path("solve", "stream"))


def build_block(ctx: RunContext, task: BlockBuild) -> dict[str, Any]:
    """A shard's kept rows as its block under solve/stream/: (signature id, utility), or with
    ``rows_spec`` (M4 embedding moments) also the projected embeddings, class and prior weight."""
    import polars as pl

    from mmbalance.operators.solve.m4.stream import signature_ids
    from mmbalance.schemas.contract import UTILITY_COLUMN

    configure_storage(ctx.recipe.storage)
    store = RunStore(ctx.out)
    shard_id = task.shard.shard_id
    keys = pl.from_arrow(store.read_table("solve", "stream", "keys.parquet"))
    tags = kept_tags(ctx, store, shard_id, task.dup_rows)
    if task.rows_spec:
        from mmbalance.operators.solve.m4.rows import RowSpec, block_totals, row_block

        spec = RowSpec.from_files(store.read_json("solve", "stream", "spec.json"), read_npz(store, "solve", "stream", "spec.npz"))
        z = kept_projections(ctx, store, task.shard, tags.column("row").to_numpy(), spec.bases)
        block = row_block(tags, keys, spec, z=z)
        store.write_bytes("solve", "stream", f"{shard_id}.npz", data=npz_bytes(**block))
        return {"shard_id": shard_id, **block_totals(block)}
    sig, u = signature_ids(tags.select(keys.columns + [UTILITY_COLUMN]), keys)
    store.write_bytes("solve", "stream", f"{shard_id}.npz", data=npz_bytes(sig=sig, u=u))
    return {"shard_id": shard_id, "rows": int(len(u)), "sum_u": float(u.sum())}


def reduce_block(ctx: RunContext, task: BlockReduce) -> dict[str, Any]:
    """One shard's sums for one dual evaluation, written beside its block."""
    from mmbalance.operators.solve.m4.stream import reduce_block as sums

    configure_storage(ctx.recipe.storage)
    store = RunStore(ctx.out)
    block = read_npz(store, "solve", "stream", f"{task.shard_id}.npz")
    payload = read_npz(store, "solve", "stream", task.t_file) if task.t_file else None
    part = sums(block, task.kind, payload, task.params)
    name = f"part-{task.call:06d}-{task.shard_id}.npz"
    store.write_bytes("solve", "stream", name, data=npz_bytes(part=part))
    return {"shard_id": task.shard_id, "part": name}
