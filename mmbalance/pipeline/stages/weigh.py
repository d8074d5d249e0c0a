"""weigh, per shard: the solution applied to the kept rows, seeded stochastic rounding, the manifest."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from mmbalance.io.store import RunStore
from mmbalance.operators.metaclip import entry_count_table
from mmbalance.pipeline.rows import kept_projections, kept_tags
from mmbalance.pipeline.stage import Output, RunContext, ShardTask, UnitStage
from mmbalance.pipeline.stages.dedup import of_shard
from mmbalance.pipeline.stages.fit import ASSIGNED
from mmbalance.pipeline.stages.scan import TAGS
from mmbalance.pipeline.stages.solve import SOLUTION, solution_digest
from mmbalance.schemas.contract import entries_column

MANIFEST = Output("manifest/{shard}.parquet")
AFTER = Output("after/{shard}.parquet")
AFTER_ENTRIES = Output("after_entries/{label}/{shard}.parquet")


@dataclass(frozen=True)
class WeighTask(ShardTask):
    solution_digest: str
    dup_rows: list[int]


class Weigh(UnitStage):
    name = "weigh"
    summary = "weights from the solution, seeded stochastic rounding"
    reads = (TAGS.one, ASSIGNED.one, SOLUTION.every)
    writes = (MANIFEST, AFTER, AFTER_ENTRIES)
    identity = ("solution_digest",)
    task_type = WeighTask

    def identity_values(self, state) -> dict[str, Any]:
        return {"solution_digest": solution_digest(state)}

    def task_fields(self, state, shard) -> dict[str, Any]:
        return {"dup_rows": of_shard(state, shard)["rows"]}

    def run(self, ctx: RunContext, task: WeighTask, store: RunStore) -> dict[str, Any]:
        from mmbalance.operators import stats, weigh

        shard_id = task.shard.shard_id
        solution = _load_solution(ctx.out, task.solution_digest)
        tags = kept_tags(ctx, store, shard_id, task.dup_rows)
        bases = getattr(solution, "embedding_sides", None)  # M4 embedding moments: weights need each row's z
        z = kept_projections(ctx, store, task.shard, tags.column("row").to_numpy(), bases) if bases else None
        manifest = weigh.weigh_tags(tags, solution, ctx.recipe.export.seed, shard_id, task.shard.relpath, projected=z)
        weights = manifest.column("weight").to_numpy()
        repeats = manifest.column("repeats").to_numpy()
        store.write_table("manifest", f"{shard_id}.parquet", table=manifest)
        store.write_table("after", f"{shard_id}.parquet", table=stats.summarise(tags, ctx.tag_columns, weights, repeats))
        for spec in ctx.recipe.metadata_labels():
            store.write_table("after_entries", spec.name, f"{shard_id}.parquet",
                              table=entry_count_table(tags.column(entries_column(spec.name)), weights))
        summary = {"rows_in": tags.num_rows, "rows_out": manifest.num_rows, "rejected": 0, "reasons": {},
                   "weight_sum": float(weights.sum()), "repeats_sum": int(repeats.sum())}
        if z is not None:  # exact embedding moments for the report, before and after
            summary["embedding_sums"] = solution.embedding_sums(tags, z, weights, repeats)
        return summary


@functools.lru_cache(maxsize=4)
def _load_solution(out: str, digest: str):
    from mmbalance.operators.solve import solution_from_dict

    return solution_from_dict(RunStore(out).read_json("solve", "solution.json"))
