"""embed, per shard: open_clip embeddings of the valid rows on an actor pool (the model loads once
per actor), or a DataComp .npz's."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.pipeline.stage import INPUT_SHARD, Output, Resources, RunContext, ShardTask, UnitStage
from mmbalance.pipeline.stages.scan import TAGS
from mmbalance.schemas.contract import REJECTS_SCHEMA
from mmbalance.schemas.recipe import Recipe

EMBEDDINGS = Output("embeddings/{shard}.parquet")
EMBED_REJECTS = Output("rejects/embed/{shard}.parquet")


@dataclass(frozen=True)
class EmbedTask(ShardTask):
    embed_info: dict[str, Any]  # what makes the embeddings (embed_record): its dimension, or "check" only


class Embed(UnitStage):
    name = "embed"
    summary = ("open_clip on an actor pool (model loaded once per actor; on CUDA nvJPEG decode and resize on the GPU) "
               "or DataComp .npz")
    reads = (INPUT_SHARD, TAGS.one)
    writes = (EMBEDDINGS, EMBED_REJECTS)
    resources = Resources("actor_pool", section="embed")
    task_type = EmbedTask

    def active(self, recipe: Recipe) -> bool:
        return recipe.embed is not None

    def unit_rows(self, state) -> list[int]:
        scans = state.summaries("scan")  # the valid rows each unit embeds (--plan before the scans: all rows)
        return [s["rows_out"] for s in scans] if scans is not None else super().unit_rows(state)

    def task_fields(self, state, shard) -> dict[str, Any]:
        return {"embed_info": state.run["embed"]}

    def run(self, ctx: RunContext, task: EmbedTask, store: RunStore) -> dict[str, Any]:
        from mmbalance.schemas.embed import sidecar_schema

        spec = ctx.recipe.embed
        fs, _ = resolve_filesystem(ctx.input_uri)
        shard = task.shard
        valid_rows = store.read_table("tags", f"{shard.shard_id}.parquet", columns=["row"]).column("row").to_numpy()
        info = task.embed_info
        check = info.get("source") == "check"  # validation: the rows the model would get, no embeddings
        fmt, verify = ctx.recipe.input.format, ctx.recipe.execution.verify_checksums
        if spec.npz is not None:
            from mmbalance.operators.precomputed import npz_sidecar_batches

            batches = npz_sidecar_batches(fs, shard.path, shard.relpath, spec.npz, ctx.recipe.input.columns.uid,
                                          ctx.recipe.execution.batch_rows, spec.on_image_error, spec.on_missing_caption,
                                          verify, fmt)
        elif check:
            from mmbalance.operators.embed.stage import EmbedColumns, check_shard

            batches = check_shard(fs, shard.path, shard.relpath, spec, info["preprocess"], EmbedColumns.from_recipe(ctx.recipe),
                                  ctx.recipe.execution.batch_rows, valid_rows, verify, fmt)
        else:
            from mmbalance.operators.embed.stage import EmbedColumns, embed_shard

            bundle = embed_bundle(spec.model_dump_json())
            batches = embed_shard(fs, shard.path, shard.relpath, bundle, EmbedColumns.from_recipe(ctx.recipe),
                                  only_rows=valid_rows, verify_checksums=verify, fmt=fmt)
        schema = None if check else sidecar_schema(int(info["embedding_dim"]), info)
        embedded = rejected = 0
        reasons: dict[str, int] = {}
        sidecars = contextlib.nullcontext() if check else store.table_writer("embeddings", f"{shard.shard_id}.parquet", schema=schema)
        with sidecars as out, store.table_writer("rejects", "embed", f"{shard.shard_id}.parquet", schema=REJECTS_SCHEMA) as rejects_out:
            for sidecar, rejects in batches:
                if spec.npz is not None:  # .npz rows cover the whole shard: keep the rows validation kept
                    sidecar = sidecar.filter(pc.is_in(sidecar.column("row"), value_set=pa.array(valid_rows)))
                    rejects = rejects.filter(pc.is_in(rejects.column("row"), value_set=pa.array(valid_rows)))
                if out is not None:
                    out.write_table(sidecar.cast(schema))
                if rejects.num_rows:
                    rejects_out.write_table(rejects)
                    for reason in rejects.column("reason").to_pylist():
                        key = reason.split(" (")[0]
                        reasons[key] = reasons.get(key, 0) + 1
                embedded += sidecar.num_rows
                rejected += rejects.num_rows
        if embedded + rejected != len(valid_rows):
            raise RuntimeError(f"{shard.relpath}: embedded {embedded} + rejected {rejected} != {len(valid_rows)} valid rows")
        return {"rows_in": len(valid_rows), "rows_out": embedded, "rejected": rejected, "reasons": reasons}


@functools.lru_cache(maxsize=2)
def embed_bundle(spec_json: str):
    """One model per worker process (an actor in Ray): loading is the expensive part."""
    from mmbalance.operators.embed.model import load_model
    from mmbalance.schemas.embed import EmbedSpec

    spec = EmbedSpec.model_validate_json(spec_json)
    return load_model(spec, num_threads=spec.threads())


def embed_record(recipe: Recipe, check_only: bool = False) -> dict[str, Any]:
    """What made the embeddings (model, weights hash, dim, versions): run.json and sidecar metadata.
    ``check_only`` (validation): only the model's image preprocessing, from its config, no weights."""
    spec = recipe.embed
    if spec.npz is not None:
        from mmbalance.operators.precomputed import npz_info

        return npz_info(spec.npz)
    if check_only:
        from mmbalance.operators.embed.model import preprocess_config

        return {"source": "check", "model": spec.model, "preprocess": preprocess_config(spec)}
    from mmbalance.operators.embed.model import model_info

    return model_info(spec)
