"""scan, per shard: validate rows, tag them (columns, caption lexicons), hash their uids, keep the
fit-sample candidates."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.io.source import read_source
from mmbalance.io.store import RunStore, UnitCheck, resolve_filesystem
from mmbalance.operators import tag, validate
from mmbalance.operators.arrays import embedding_matrix, fixed_size_list
from mmbalance.operators.hashing import hash_uids, sample_priority_of_hashes
from mmbalance.pipeline.rows import embedding_columns
from mmbalance.pipeline.stage import INPUT_SHARD, Output, RunContext, ShardTask, UnitStage
from mmbalance.schemas.contract import REJECTS_SCHEMA, UID_HASH_SCHEMA, InputError, add_reasons, tags_schema
from mmbalance.schemas.recipe import Recipe

TAGS = Output("tags/{shard}.parquet")
UIDS = Output("uids/{shard}.parquet")
VALIDATE_REJECTS = Output("rejects/validate/{shard}.parquet")
SAMPLE = Output("sample/{shard}.parquet")


@dataclass(frozen=True)
class ScanTask(ShardTask):
    sample_threshold: int | None  # the fit-sample priority cut-off (None: no sample)


class Scan(UnitStage):
    name = "scan"
    summary = "validate rows, tag (columns, caption lexicons), hash uids, keep sample candidates"
    reads = (INPUT_SHARD,)
    writes = (TAGS, UIDS, VALIDATE_REJECTS, SAMPLE)
    identity = ("sample_threshold",)
    task_type = ScanTask

    def identity_values(self, state) -> dict[str, Any]:
        return {"sample_threshold": state.ctx.sample_threshold}

    def plan_checks(self, state) -> dict[str, UnitCheck]:
        """A scan whose recorded sample threshold is higher than the current one is narrowed by the
        run (resume.narrow_samples), not redone; a lower one is redone."""
        threshold, store = state.ctx.sample_threshold, state.store
        found = store.check_units(self.name, self.keys(state))
        for key, check in found.items():
            if check.status == "done" and threshold is not None:
                recorded = (store.read_marker(self.name, key) or {}).get("sample_threshold")
                if not (isinstance(recorded, int) and recorded >= threshold):
                    found[key] = UnitCheck("changed")
        return found

    def run(self, ctx: RunContext, task: ScanTask, store: RunStore) -> dict[str, Any]:
        fs, _ = resolve_filesystem(ctx.input_uri)
        shard = task.shard
        dims = dict(ctx.embedding_dims)
        tagger = row_tagger(ctx.recipe)
        rows_in = valid = 0
        reasons: dict[str, int] = {}
        hashes, hash_rows, audits, samples = [], [], [], []
        heavy = heavy_columns(ctx.recipe)
        with store.table_writer("tags", f"{shard.shard_id}.parquet", schema=tags_schema(ctx.recipe)) as tags_out, \
                store.table_writer("rejects", "validate", f"{shard.shard_id}.parquet", schema=REJECTS_SCHEMA) as rejects_out:
            for table in read_source(fs, shard.path, shard.relpath, list(ctx.source_columns), ctx.recipe.execution.batch_rows,
                                     ctx.recipe.input.format, ctx.recipe.execution.verify_checksums):
                result = validate.validate_rows(table, ctx.recipe, dims, shard.relpath, rows_in)
                keep = np.flatnonzero(result.valid)
                # scan-time taggers read no embedding or image: copy only the columns they may read
                light = table.drop_columns([c for c in heavy if c in table.column_names])
                tags, audit = tagger(light if len(keep) == light.num_rows else light.take(keep), keep + rows_in)
                tags_out.write_table(tags)
                if result.rejects.num_rows:
                    rejects_out.write_table(result.rejects)
                hashes.append(hash_uids(tags.column("uid")))
                hash_rows.append(keep + rows_in)
                if audit:
                    audits.append(audit)
                if task.sample_threshold is not None and len(keep):
                    candidates = sample_candidates(ctx, task.sample_threshold, table, tags, keep, hashes[-1])
                    if candidates is not None:
                        samples.append(candidates)
                add_reasons(reasons, result.reason_counts)
                rows_in += table.num_rows
                valid += len(keep)
        all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        all_rows = np.concatenate(hash_rows) if hash_rows else np.zeros(0, np.int64)
        order = np.argsort(all_hashes, kind="stable")
        store.write_table(
            "uids", f"{shard.shard_id}.parquet",
            table=pa.table({"uid_hash": all_hashes[order], "row": all_rows[order].astype(np.int64)}, schema=UID_HASH_SCHEMA),
            row_group_size=65536,
        )
        sampled = 0
        if task.sample_threshold is not None and samples:
            sampled = write_sample(store, shard.shard_id, pa.concat_tables(samples))
        if rows_in != shard.num_rows:
            raise InputError(f"{shard.relpath}: its footer (or side table) says {shard.num_rows} rows, read {rows_in}")
        return {"rows_in": rows_in, "rows_out": valid, "rejected": rows_in - valid, "reasons": reasons, "sampled": sampled,
                "audit": tag.merge_audits(audits)}


@functools.lru_cache(maxsize=4)
def _row_tagger(recipe_json: str) -> tag.RowTagger:
    return tag.RowTagger(Recipe.model_validate_json(recipe_json))


def row_tagger(recipe: Recipe) -> tag.RowTagger:
    """One tagger per process and recipe: caption lexicons compile once, not per shard."""
    return _row_tagger(recipe.model_dump_json())


def heavy_columns(recipe: Recipe) -> list[str]:
    """Source columns no scan-time tagger reads (embeddings, image bytes): the rows kept for tagging
    are taken without them."""
    cols = recipe.input.columns
    read = {*validate.text_columns(recipe), cols.utility}
    return [c for c in (cols.image_embedding, cols.text_embedding, cols.image) if c and c not in read]


def sample_candidates(ctx: RunContext, threshold: int, table: pa.Table, tags: pa.Table, keep: np.ndarray,
                      uid_hashes: np.ndarray) -> pa.Table | None:
    priority = sample_priority_of_hashes(uid_hashes, ctx.recipe.sample.seed)
    chosen = np.flatnonzero(priority <= np.uint64(threshold))
    if len(chosen) == 0:
        return None
    out = tags.take(chosen).append_column("priority", pa.array(priority[chosen], pa.uint64()))
    if ctx.recipe.embed is not None:
        return out  # embeddings are made later: the fit attaches them from embeddings/
    for name, column in embedding_columns(ctx.recipe).items():
        matrix, _ = embedding_matrix(table.column(column).take(pa.array(keep[chosen])), dict(ctx.embedding_dims)[column])
        out = out.append_column(name, fixed_size_list(matrix.astype(np.float16)))
    return out


def write_sample(store: RunStore, shard_id: str, candidates: pa.Table) -> int:
    """A shard's fit-sample candidates, laid out one way whatever their batches (so a grown corpus's
    candidates cut from an earlier scan, resume.narrow_samples, are the bytes a fresh scan writes)."""
    if candidates.num_rows:
        # one list child name too: Parquet reads a list's child back as "element", Arrow makes "item"
        fields = [pa.field(f.name, pa.list_(f.type.value_type, f.type.list_size) if pa.types.is_fixed_size_list(f.type) else f.type,
                           f.nullable) for f in candidates.schema]
        store.write_table("sample", f"{shard_id}.parquet", table=candidates.cast(pa.schema(fields)).combine_chunks(), packed=True)
    return candidates.num_rows
