"""Per-shard and per-bucket units of work. Each reads its inputs, writes its outputs atomically under
OUT keyed by shard id, and writes its done marker last; each returns a small JSON-able summary."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mmbalance.operators import cluster, dedup, stats, tag, validate, weigh
from mmbalance.operators.solve import solution_from_dict
from mmbalance.pipeline.store import RunStore, resolve_filesystem
from mmbalance.schemas.contract import REJECTS_SCHEMA, UID_HASH_SCHEMA, InputError, tag_column, tags_schema
from mmbalance.schemas.recipe import Recipe


SAMPLE_IMAGE, SAMPLE_TEXT = "image_emb", "text_emb"  # embedding columns of the fit sample


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


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(ctx, task):
        start = time.perf_counter()
        summary = fn(ctx, task)
        summary["seconds"] = round(time.perf_counter() - start, 4)
        return summary

    return wrapper


# -- scan: validate + tag + uid hashes + sample candidates -------------------------------------


@functools.lru_cache(maxsize=4)
def _row_tagger(recipe_json: str) -> tag.RowTagger:
    return tag.RowTagger(Recipe.model_validate_json(recipe_json))


def row_tagger(recipe: Recipe) -> tag.RowTagger:
    """One tagger per process and recipe: caption lexicons compile once, not per shard."""
    return _row_tagger(recipe.model_dump_json())


def read_batches(handle, relpath: str, columns: list[str], batch_rows: int):
    """Record batches of a source shard; a corrupt page is an input error naming the file."""
    try:
        pfile = pq.ParquetFile(handle)
        batches = pfile.iter_batches(batch_size=batch_rows, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise InputError(f"{relpath}: unreadable data ({str(err).splitlines()[0]})") from None


def embedding_columns(recipe: Recipe) -> dict[str, str]:
    """Source embedding columns by sample-table name."""
    cols = recipe.input.columns
    out = {}
    if cols.image_embedding:
        out[SAMPLE_IMAGE] = cols.image_embedding
    if cols.text_embedding:
        out[SAMPLE_TEXT] = cols.text_embedding
    return out


def _sample_candidates(ctx: RunContext, table: pa.Table, tags: pa.Table, keep: np.ndarray) -> pa.Table | None:
    priority = cluster.sample_priority(tags.column("uid"), ctx.recipe.sample.seed)
    chosen = np.flatnonzero(priority <= np.uint64(ctx.sample_threshold))
    if len(chosen) == 0:
        return None
    out = tags.take(chosen).append_column("priority", pa.array(priority[chosen], pa.uint64()))
    for name, column in embedding_columns(ctx.recipe).items():
        matrix, _ = cluster.embedding_matrix(table.column(column).take(pa.array(keep[chosen])), dict(ctx.embedding_dims)[column])
        out = out.append_column(name, cluster.fixed_size_list(matrix.astype(np.float16)))
    return out


@_timed
def scan_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    fs, _ = resolve_filesystem(ctx.input_uri)
    shard_id, relpath = task["shard_id"], task["relpath"]
    dims = dict(ctx.embedding_dims)
    tagger = row_tagger(ctx.recipe)
    rows_in = valid = 0
    reasons: dict[str, int] = {}
    hashes, hash_rows, audits, samples = [], [], [], []
    with fs.open_input_file(task["path"]) as handle, \
            store.table_writer("tags", f"{shard_id}.parquet", schema=tags_schema(ctx.recipe)) as tags_out, \
            store.table_writer("rejects", "validate", f"{shard_id}.parquet", schema=REJECTS_SCHEMA) as rejects_out:
        for table in read_batches(handle, relpath, list(ctx.source_columns), ctx.recipe.execution.batch_rows):
            result = validate.validate_rows(table, ctx.recipe, dims, relpath, rows_in)
            keep = np.flatnonzero(result.valid)
            tags, audit = tagger(table.take(keep), keep + rows_in)
            tags_out.write_table(tags)
            if result.rejects.num_rows:
                rejects_out.write_table(result.rejects)
            hashes.append(dedup.hash_uids(tags.column("uid")))
            hash_rows.append(keep + rows_in)
            if audit:
                audits.append(audit)
            if ctx.sample_threshold is not None and len(keep):
                candidates = _sample_candidates(ctx, table, tags, keep)
                if candidates is not None:
                    samples.append(candidates)
            for k, v in result.reason_counts.items():
                reasons[k] = reasons.get(k, 0) + v
            rows_in += table.num_rows
            valid += len(keep)
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    all_rows = np.concatenate(hash_rows) if hash_rows else np.zeros(0, np.int64)
    order = np.argsort(all_hashes, kind="stable")
    store.write_table(
        "uids", f"{shard_id}.parquet",
        table=pa.table({"uid_hash": all_hashes[order], "row": all_rows[order].astype(np.int64)}, schema=UID_HASH_SCHEMA),
        row_group_size=65536,
    )
    sampled = 0
    if ctx.sample_threshold is not None:
        sample = pa.concat_tables(samples) if samples else None
        if sample is not None:
            sampled = sample.num_rows
            store.write_table("sample", f"{shard_id}.parquet", table=sample)
    if rows_in != task["num_rows"]:
        raise InputError(f"{relpath}: footer says {task['num_rows']} rows, read {rows_in}")
    summary = {"shard_id": shard_id, "rows_in": rows_in, "valid": valid, "rejected": rows_in - valid,
               "reasons": reasons, "sampled": sampled, "audit": tag.merge_audits(audits)}
    store.mark_done("scan", shard_id, summary)
    return summary


# -- dedup: one bucket of the uid-hash space -----------------------------------------------------


@_timed
def dedup_bucket(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    lo, hi = int(task["lo"]), int(task["hi"])
    shard_ids: list[str] = task["shard_ids"]
    paths = [store.path("uids", f"{sid}.parquet") for sid in shard_ids]
    dataset = pads.dataset(paths, filesystem=store.fs, format="parquet", schema=UID_HASH_SCHEMA)
    cond = (pads.field("uid_hash") >= pa.scalar(lo, pa.uint64())) & (pads.field("uid_hash") <= pa.scalar(hi, pa.uint64()))
    index_of = {p: i for i, p in enumerate(paths)}
    parts_hash, parts_row, parts_shard = [], [], []
    for fragment in dataset.get_fragments():
        table = fragment.to_table(filter=cond)  # row-group statistics skip most of each sorted file
        if table.num_rows:
            parts_hash.append(table.column("uid_hash").to_numpy())
            parts_row.append(table.column("row").to_numpy())
            parts_shard.append(np.full(table.num_rows, index_of[fragment.path], np.int64))
    rows_seen = int(sum(len(h) for h in parts_hash))

    def fetch_uids(shard_pos: int, rows: np.ndarray) -> list[str]:
        tags = store.read_table("tags", f"{shard_ids[shard_pos]}.parquet", columns=["row", "uid"])
        picked = tags.filter(pc.is_in(tags.column("row"), value_set=pa.array(rows, pa.int64())))
        by_row = dict(zip(picked.column("row").to_pylist(), picked.column("uid").to_pylist()))
        return [by_row[int(r)] for r in rows]

    if parts_hash:
        dups = dedup.find_duplicates(
            np.concatenate(parts_shard), np.concatenate(parts_row), np.concatenate(parts_hash), fetch_uids
        )
    else:
        dups = dedup.DUPLICATES_SCHEMA.empty_table()
    key = f"{task['bucket']:05d}-of-{task['buckets']:05d}"
    store.write_table("dedup", f"bucket-{key}.parquet", table=dups)
    summary = {"bucket": key, "rows": rows_seen, "duplicates": dups.num_rows}
    store.mark_done("dedup", key, summary)
    return summary



# -- signatures: per-shard counts of valid, first-occurrence rows -------------------------------


def _drop_duplicates(tags: pa.Table, dup_rows: list[int]) -> tuple[pa.Table, pa.Table]:
    if not dup_rows:
        return tags, tags.slice(0, 0)
    is_dup = pc.is_in(tags.column("row"), value_set=pa.array(dup_rows, pa.int64()))
    return tags.filter(pc.invert(is_dup)), tags.filter(is_dup)


@_timed
def signatures_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    tags = load_tags(ctx, store, shard_id)
    kept, dups = _drop_duplicates(tags, task["dup_rows"])
    if dups.num_rows:
        first = {int(r): (fs, int(fr)) for r, fs, fr in zip(task["dup_rows"], task["dup_first_shard"], task["dup_first_row"])}
        reasons = [f"duplicate uid: first seen in {first[r][0]} row {first[r][1]}" for r in dups.column("row").to_pylist()]
        rejects = pa.table(
            {
                "uid": dups.column("uid"),
                "shard": pa.array([task["relpath"]] * dups.num_rows, pa.string()),
                "row": dups.column("row"),
                "stage": pa.array(["dedup"] * dups.num_rows, pa.string()),
                "reason": pa.array(reasons, pa.string()),
            },
            schema=REJECTS_SCHEMA,
        )
        store.write_table("rejects", "dedup", f"{shard_id}.parquet", table=rejects)
    store.write_table("signatures", f"{shard_id}.parquet", table=stats.summarise(kept, ctx.tag_columns))
    summary = {"shard_id": shard_id, "rows": kept.num_rows, "duplicates": dups.num_rows}
    store.mark_done("signatures", shard_id, summary)
    return summary



# -- weigh: the solution applied, stochastic rounding, manifest --------------------------------


@functools.lru_cache(maxsize=4)
def _load_solution(out: str, digest: str):
    return solution_from_dict(RunStore(out).read_json("solve", "solution.json"))


@_timed
def weigh_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    solution = _load_solution(ctx.out, task["solution_digest"])
    tags, _ = _drop_duplicates(load_tags(ctx, store, shard_id), task["dup_rows"])
    manifest = weigh.weigh_tags(tags, solution, ctx.recipe.export.seed, shard_id, task["relpath"])
    weights = manifest.column("weight").to_numpy()
    repeats = manifest.column("repeats").to_numpy()
    store.write_table("manifest", f"{shard_id}.parquet", table=manifest)
    store.write_table("after", f"{shard_id}.parquet", table=stats.summarise(tags, ctx.tag_columns, weights, repeats))
    summary = {
        "shard_id": shard_id,
        "rows": manifest.num_rows,
        "weight_sum": float(weights.sum()),
        "repeats_sum": int(repeats.sum()),
    }
    store.mark_done("weigh", shard_id, summary)
    return summary



# -- assign: cluster and subclass ids from the fitted models ------------------------------------


@functools.lru_cache(maxsize=4)
def _load_models(out: str, digest: str):
    from mmbalance.pipeline.fit import load_models

    return load_models(RunStore(out))


@_timed
def assign_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """Cluster/subclass ids of every valid row, in the row order of the tags sidecar."""
    from mmbalance.pipeline.fit import assign_table, assigned_schema

    store = RunStore(ctx.out)
    fs, _ = resolve_filesystem(ctx.input_uri)
    shard_id, relpath = task["shard_id"], task["relpath"]
    models = _load_models(ctx.out, task["models_digest"])
    tags = store.read_table("tags", f"{shard_id}.parquet")
    valid_rows = tags.column("row").to_numpy()
    columns = list(embedding_columns(ctx.recipe).values())
    parts, offset, start = [], 0, 0
    with fs.open_input_file(task["path"]) as handle, \
            store.table_writer("assign", f"{shard_id}.parquet", schema=assigned_schema(ctx.recipe)) as out:
        for table in read_batches(handle, relpath, columns, ctx.recipe.execution.batch_rows):
            rows = np.arange(start, start + table.num_rows)
            start += table.num_rows
            # tags rows are ascending, so each batch's valid rows are the next slice of them
            stop = offset + int(np.searchsorted(valid_rows[offset:], rows[-1], side="right")) if len(rows) else offset
            mine = valid_rows[offset:stop]
            offset = stop
            if len(mine) == 0:
                continue
            batch = table.take(pa.array(mine - rows[0]))
            out.write_table(assign_table(ctx, models, batch, tags.slice(offset - len(mine), len(mine))))
            parts.append(len(mine))
    if offset != len(valid_rows):
        raise RuntimeError(f"{relpath}: assigned {offset} of {len(valid_rows)} valid rows")
    summary = {"shard_id": shard_id, "rows": int(sum(parts))}
    store.mark_done("assign", shard_id, summary)
    return summary


def load_tags(ctx: RunContext, store: RunStore, shard_id: str) -> pa.Table:
    """The tags sidecar joined with assigned cluster/subclass tags (same rows, same order)."""
    tags = store.read_table("tags", f"{shard_id}.parquet")
    if not (ctx.recipe.clusters or ctx.recipe.subclasses):
        return tags
    assigned = store.read_table("assign", f"{shard_id}.parquet")
    if not tags.column("row").equals(assigned.column("row")):
        raise RuntimeError(f"shard {shard_id}: assign/ and tags/ rows differ")
    for name in assigned.column_names:
        if name != "row":
            tags = tags.append_column(name, assigned.column(name))
    return tags
