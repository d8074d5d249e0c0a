"""fit (global): the uniform fit sample, and the zero-shot, cluster and subclass models fitted on it
(pipeline/fit.py); assign (per shard): every valid row's zero-shot, cluster and subclass tags from
those models. Nothing here imports faiss at module level: a scan worker loads this module too."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.io.store import RunStore
from mmbalance.operators import tag
from mmbalance.pipeline.rows import embedding_batches
from mmbalance.pipeline.stage import INPUT_SHARD, GlobalStage, OneOf, Output, RunContext, ShardTask, UnitStage
from mmbalance.pipeline.stages.dedup import DEDUP, duplicates
from mmbalance.pipeline.stages.embed import EMBEDDINGS
from mmbalance.pipeline.stages.scan import SAMPLE, TAGS
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import Recipe

FIT_SAMPLE = Output("fit/sample.parquet")
MODELS = Output("models/*")
ASSIGNED = Output("assign/{shard}.parquet")


class Fit(GlobalStage):
    name = "fit"
    summary = "the uniform fit sample; prompt embeddings, faiss k-means, SBCL subclasses"
    reads = (SAMPLE.every, EMBEDDINGS.every, DEDUP.every)
    writes = (FIT_SAMPLE, MODELS)
    done_key = "models"

    def active(self, recipe: Recipe) -> bool:
        return recipe.needs_sample()

    def run(self, state) -> dict[str, Any]:
        from mmbalance.pipeline import fit as fitting

        recipe, store, dups = state.recipe, state.store, duplicates(state)
        n_dups = sum(len(d["rows"]) for d in dups.values())
        sample = fitting.merge_sample(store, state.shards, dups, recipe.sample_size(), embedded=recipe.embed is not None)
        if sample is None:
            if recipe.needs_derive():
                raise InputError("the fit sample is empty: no valid rows to cluster or tag")
            return {"sample_rows": 0}
        sample, info = fitting.fit_models(recipe, store, sample, state.shards, dups, state.valid_rows() - n_dups, ctx=state.ctx)
        store.write_table("fit", "sample.parquet", table=sample, packed=True)
        return info


def models_digest(state) -> str | None:
    """The digest of the fitted models (assign's identity); None until the fit is done."""
    if not state.finished("fit"):
        return None

    def digest() -> str:
        from mmbalance.pipeline.fit import models_digest as of_store

        return of_store(state.store)

    return state.memo("models_digest", digest)


@dataclass(frozen=True)
class AssignTask(ShardTask):
    models_digest: str


class Assign(UnitStage):
    name = "assign"
    summary = "zero-shot, cluster and subclass tags of every valid row"
    reads = (OneOf((INPUT_SHARD, EMBEDDINGS.one)), TAGS.one, MODELS.every)
    writes = (ASSIGNED,)
    identity = ("models_digest",)
    task_type = AssignTask

    def active(self, recipe: Recipe) -> bool:
        return recipe.needs_derive()

    def identity_values(self, state) -> dict[str, Any]:
        return {"models_digest": models_digest(state)}

    def run(self, ctx: RunContext, task: AssignTask, store: RunStore) -> dict[str, Any]:
        """Cluster/subclass ids of every valid row, aligned to the rows of the tags sidecar (null
        where a row has no embedding)."""
        import polars as pl

        from mmbalance.operators.assign import assign_table, assigned_schema
        from mmbalance.pipeline.fit import assign_columns

        shard_id = task.shard.shard_id
        models = _load_models(ctx.out, task.models_digest)
        columns = assign_columns(ctx.recipe)
        tags = store.read_table("tags", f"{shard_id}.parquet")
        valid_rows = tags.column("row").to_numpy()
        position = {int(r): i for i, r in enumerate(valid_rows)} if ctx.recipe.embed is not None else None
        parts, audits = [], []
        for rows, batch in embedding_batches(ctx, store, task.shard, valid_rows):
            if position is None:  # source rows: the next slice of tags, in order
                lo = int(np.searchsorted(valid_rows, rows[0]))
                idx = np.arange(lo, lo + len(rows))
            else:
                idx = np.array([position[int(r)] for r in rows], np.int64)
            table, audit = assign_table(ctx.recipe, models, batch, tags.take(pa.array(idx)), columns)
            parts.append(table)
            if audit:
                audits.append(audit)
        schema = assigned_schema(ctx.recipe)
        assigned = pa.concat_tables(parts) if parts else schema.empty_table()
        if assigned.num_rows != tags.num_rows:  # rows without embeddings get null ids
            frame = pl.from_arrow(tags.select(["row"])).join(pl.from_arrow(assigned), on="row", how="left", maintain_order="left")
            assigned = frame.to_arrow().cast(schema)
        store.write_table("assign", f"{shard_id}.parquet", table=assigned)
        # rows without an embedding keep null ids: every valid row goes on, none is rejected here
        return {"rows_in": tags.num_rows, "rows_out": tags.num_rows, "rejected": 0, "reasons": {},
                "embedded": int(sum(p.num_rows for p in parts)), "audit": tag.merge_audits(audits)}


@functools.lru_cache(maxsize=4)
def _load_models(out: str, digest: str):
    from mmbalance.operators.models import load_models

    return load_models(RunStore(out))
