"""signatures, per shard: counts per tag combination of the valid, first-occurrence rows (and the
duplicates' rejects); and the corpus totals merged from them, which the solve and the report read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.io.store import RunStore
from mmbalance.operators.metaclip import entry_count_table
from mmbalance.pipeline.rows import drop_rows, embed_rejected_rows, load_tags
from mmbalance.pipeline.stage import Output, RunContext, ShardTask, UnitStage
from mmbalance.pipeline.stages.dedup import DEDUP, of_shard
from mmbalance.pipeline.stages.embed import EMBED_REJECTS
from mmbalance.pipeline.stages.fit import ASSIGNED
from mmbalance.pipeline.stages.scan import TAGS
from mmbalance.schemas.contract import REJECTS_SCHEMA, entries_column, tag_column

SIGNATURES = Output("signatures/{shard}.parquet")
DEDUP_REJECTS = Output("rejects/dedup/{shard}.parquet")
ENTRIES = Output("entries/{label}/{shard}.parquet")


@dataclass(frozen=True)
class SignaturesTask(ShardTask):
    dup_rows: list[int]
    dup_first_shard: list[str]  # relpath where each duplicate was first seen
    dup_first_row: list[int]


class Signatures(UnitStage):
    name = "signatures"
    summary = "counts per tag combination of valid, first-occurrence rows"
    reads = (TAGS.one, ASSIGNED.one, EMBED_REJECTS.one, DEDUP.every)
    writes = (SIGNATURES, DEDUP_REJECTS, ENTRIES)
    task_type = SignaturesTask

    def task_fields(self, state, shard) -> dict[str, Any]:
        d = of_shard(state, shard)
        return {"dup_rows": d["rows"], "dup_first_shard": d["first_shard"], "dup_first_row": d["first_row"]}

    def run(self, ctx: RunContext, task: SignaturesTask, store: RunStore) -> dict[str, Any]:
        from mmbalance.operators import stats

        shard_id = task.shard.shard_id
        tags, _ = drop_rows(load_tags(ctx, store, shard_id), embed_rejected_rows(ctx, store, shard_id))
        kept, dups = drop_rows(tags, task.dup_rows)  # a row rejected by embed is not counted again
        if dups.num_rows:
            first = {int(r): (fs, int(fr)) for r, fs, fr in zip(task.dup_rows, task.dup_first_shard, task.dup_first_row)}
            reasons = [f"duplicate uid: first seen in {first[r][0]} row {first[r][1]}" for r in dups.column("row").to_pylist()]
            rejects = pa.table(
                {
                    "uid": dups.column("uid"),
                    "shard": pa.array([task.shard.relpath] * dups.num_rows, pa.string()),
                    "row": dups.column("row"),
                    "stage": pa.array(["dedup"] * dups.num_rows, pa.string()),
                    "reason": pa.array(reasons, pa.string()),
                },
                schema=REJECTS_SCHEMA,
            )
            store.write_table("rejects", "dedup", f"{shard_id}.parquet", table=rejects)
        store.write_table("signatures", f"{shard_id}.parquet", table=stats.summarise(kept, ctx.tag_columns))
        for spec in ctx.recipe.metadata_labels():  # per-entry counts: sparse, merged by summing
            store.write_table("entries", spec.name, f"{shard_id}.parquet", table=entry_count_table(kept.column(entries_column(spec.name))))
        return {"rows_in": tags.num_rows, "rows_out": kept.num_rows, "rejected": dups.num_rows,
                "reasons": {"duplicate uid": dups.num_rows} if dups.num_rows else {}}


# -- the corpus totals: merged once per run, read by the solve and the report -------------------------


def merged(state) -> pa.Table:
    """The corpus's signature counts (every shard's summed)."""
    from mmbalance.operators import stats

    return state.memo("signatures", lambda: stats.merge(
        (state.store.read_table("signatures", f"{s.shard_id}.parquet") for s in state.shards), state.ctx.tag_columns))


def vocabulary(state) -> dict[str, list[str]]:
    """Every attribute's and label's values: declared, or those the corpus has."""

    def collect() -> dict[str, list[str]]:
        from mmbalance.operators import stats

        recipe, before = state.recipe, merged(state)
        vocab = {a.name: list(a.values) for a in recipe.attributes}
        declared = {lab.name: lab.values for lab in recipe.labels}
        for name in recipe.label_names():
            vocab[name] = list(declared[name]) if declared.get(name) else stats.vocabulary(before, tag_column(name))
        return vocab

    return state.memo("vocabulary", collect)


def merged_entries(state, directory: str, name: str, size: int) -> np.ndarray:
    """Global per-entry counts (or weights) of a metadata label from its per-shard sparse tables."""
    from mmbalance.operators.metaclip import merge_entry_counts

    return merge_entry_counts((state.store.read_table(directory, name, f"{s.shard_id}.parquet") for s in state.shards), size)


def entry_counts(state) -> dict[str, np.ndarray]:
    """Per metadata label, the corpus's count of each entry."""

    def count() -> dict[str, np.ndarray]:
        from mmbalance.data import load_lines

        return {spec.name: merged_entries(state, "entries", spec.name, len(load_lines(spec.metadata.entries)))
                for spec in state.recipe.metadata_labels()}

    return state.memo("entry_counts", count)
