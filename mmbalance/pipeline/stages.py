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
import pyarrow.parquet as pq

# Ray workers import this module to run any stage: what only some stages need (polars, scipy through
# the solvers, the stats summaries) is imported inside them, so a scan worker stays ~100 MB leaner.
from mmbalance.operators import dedup, tag, validate
from mmbalance.operators.arrays import embedding_matrix, fixed_size_list, sample_priority
from mmbalance.pipeline.plan import check_accounting
from mmbalance.pipeline.rows import (  # noqa: F401 - SAMPLE_* and read_batches are used through this module too
    SAMPLE_IMAGE,
    SAMPLE_TEXT,
    drop_rows,
    embedding_batches,
    embedding_columns,
    read_batches,
)
from mmbalance.pipeline.store import RunStore, resolve_filesystem
from mmbalance.schemas.contract import REJECTS_SCHEMA, UID_HASH_SCHEMA, InputError, entries_column, tag_column, tags_schema
from mmbalance.schemas.recipe import Recipe


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


_STARTED = "_started"
IDENTITY = "_identity"  # task fields a done marker records and a resume compares (e.g. the solution digest)


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(ctx, task):
        task = {**task, _STARTED: time.perf_counter()}
        summary = fn(ctx, task)
        summary.setdefault("seconds", round(time.perf_counter() - task[_STARTED], 4))
        return summary

    return wrapper


def _mark_done(store: RunStore, stage: str, key: str, summary: dict[str, Any], task: dict[str, Any]) -> None:
    """The done marker, written last: the unit's seconds (stats/stages.json sums them), the task's
    identity values, and the record of every file the unit wrote through ``store``."""
    check_accounting(stage, summary)
    for name in task.get(IDENTITY, ()):
        summary[name] = task[name]
    if _STARTED in task:
        summary["seconds"] = round(time.perf_counter() - task[_STARTED], 4)
    store.mark_done(stage, key, summary)


UNIT = "_unit"  # the task field naming its unit (shard id or bucket key), for deferred failures


def deferring(stage: str, fn, task: dict[str, Any]) -> dict[str, Any]:
    """``fn(task)``; bad input (an unreadable shard) is recorded in OUT/_failed/<stage>/<unit>.json
    and returned as a failure instead of stopping the stage (execution.on_unit_error: defer)."""
    store = RunStore(fn.args[0].out)
    try:
        summary = fn(task)
    except InputError as err:
        reason = str(err).splitlines()[0]
        store.write_json("_failed", stage, f"{task[UNIT]}.json", obj={"unit": task[UNIT], "reason": reason,
                                                                      "rows": task.get("num_rows")})
        return {"_failed": task[UNIT], "reason": reason}
    if store.exists("_failed", stage, f"{task[UNIT]}.json"):  # retried and done: no longer failed
        store.fs.delete_file(store.path("_failed", stage, f"{task[UNIT]}.json"))
    return summary


# -- scan: validate + tag + uid hashes + sample candidates -------------------------------------


@functools.lru_cache(maxsize=4)
def _row_tagger(recipe_json: str) -> tag.RowTagger:
    return tag.RowTagger(Recipe.model_validate_json(recipe_json))


def row_tagger(recipe: Recipe) -> tag.RowTagger:
    """One tagger per process and recipe: caption lexicons compile once, not per shard."""
    return _row_tagger(recipe.model_dump_json())


def _sample_candidates(ctx: RunContext, table: pa.Table, tags: pa.Table, keep: np.ndarray) -> pa.Table | None:
    priority = sample_priority(tags.column("uid"), ctx.recipe.sample.seed)
    chosen = np.flatnonzero(priority <= np.uint64(ctx.sample_threshold))
    if len(chosen) == 0:
        return None
    out = tags.take(chosen).append_column("priority", pa.array(priority[chosen], pa.uint64()))
    if ctx.recipe.embed is not None:
        return out  # embeddings are made later: the fit attaches them from embeddings/
    for name, column in embedding_columns(ctx.recipe).items():
        matrix, _ = embedding_matrix(table.column(column).take(pa.array(keep[chosen])), dict(ctx.embedding_dims)[column])
        out = out.append_column(name, fixed_size_list(matrix.astype(np.float16)))
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
        for table in read_batches(handle, relpath, list(ctx.source_columns), ctx.recipe.execution.batch_rows,
                                  ctx.recipe.execution.verify_checksums):
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
    summary = {"shard_id": shard_id, "rows_in": rows_in, "rows_out": valid, "rejected": rows_in - valid,
               "reasons": reasons, "sampled": sampled, "audit": tag.merge_audits(audits)}
    _mark_done(store, "scan", shard_id, summary, task)
    return summary


# -- dedup: one bucket of the uid-hash space -----------------------------------------------------


def _hash_range(store: RunStore, shard_id: str, lo: int, hi: int):
    """The (uid_hash, row) rows of a shard's sorted uid file with lo <= uid_hash <= hi: row-group
    statistics skip the row groups outside the range, so a bucket reads a slice of each file."""
    with store.fs.open_input_file(store.path("uids", f"{shard_id}.parquet")) as handle:
        pfile = pq.ParquetFile(handle)
        column = pfile.schema_arrow.get_field_index("uid_hash")
        for i in range(pfile.metadata.num_row_groups):
            st = pfile.metadata.row_group(i).column(column).statistics
            if st is not None and st.has_min_max and (st.max < lo or st.min > hi):
                continue
            table = pfile.read_row_group(i).cast(UID_HASH_SCHEMA)
            hashes = table.column("uid_hash")
            keep = pc.and_(pc.greater_equal(hashes, pa.scalar(lo, pa.uint64())), pc.less_equal(hashes, pa.scalar(hi, pa.uint64())))
            table = table.filter(keep)
            if table.num_rows:
                yield table


@_timed
def dedup_bucket(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    lo, hi = int(task["lo"]), int(task["hi"])
    shard_ids: list[str] = task["shard_ids"]
    parts_hash, parts_row, parts_shard = [], [], []
    for index, sid in enumerate(shard_ids):
        for table in _hash_range(store, sid, lo, hi):
            parts_hash.append(table.column("uid_hash").to_numpy())
            parts_row.append(table.column("row").to_numpy())
            parts_shard.append(np.full(table.num_rows, index, np.int64))
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
    # duplicates are found here and rejected by the signatures stage: nothing leaves the run here
    summary = {"bucket": key, "rows_in": rows_seen, "rows_out": rows_seen, "rejected": 0, "reasons": {},
               "duplicates": dups.num_rows}
    _mark_done(store, "dedup", key, summary, task)
    return summary


# -- signatures: per-shard counts of valid, first-occurrence rows -------------------------------


def entry_count_table(entries: pa.ChunkedArray | pa.Array, weights: np.ndarray | None = None) -> pa.Table:
    """Sparse (entry_id, count) of a multi-hot column; with ``weights``, the weight of the rows
    matching each entry (float count)."""
    arr = entries.combine_chunks() if isinstance(entries, pa.ChunkedArray) else entries
    ids = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    w = None if weights is None else np.asarray(weights, np.float64)[pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)]
    size = int(ids.max()) + 1 if len(ids) else 0
    counts = np.bincount(ids, weights=w, minlength=size)
    nz = np.flatnonzero(counts)
    count = pa.array(counts[nz], pa.float64() if weights is not None else pa.int64())
    return pa.table({"entry_id": pa.array(nz, pa.int32()), "count": count})


def kept_tags(ctx: RunContext, store: RunStore, shard_id: str, dup_rows) -> pa.Table:
    """A shard's tags without its duplicates and the rows the embed stage rejected: the manifest's rows."""
    dropped = np.concatenate([np.asarray(dup_rows, np.int64), embed_rejected_rows(ctx, store, shard_id)])
    return drop_rows(load_tags(ctx, store, shard_id), dropped)[0]


def embed_rejected_rows(ctx: RunContext, store: RunStore, shard_id: str) -> np.ndarray:
    """Rows the embed stage rejected (undecodable images, ...): out of the manifest like duplicates."""
    if ctx.recipe.embed is None or not store.exists("rejects", "embed", f"{shard_id}.parquet"):
        return np.zeros(0, np.int64)
    return store.read_table("rejects", "embed", f"{shard_id}.parquet", columns=["row"]).column("row").to_numpy()


@_timed
def signatures_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    tags, _ = drop_rows(load_tags(ctx, store, shard_id), embed_rejected_rows(ctx, store, shard_id))
    kept, dups = drop_rows(tags, task["dup_rows"])  # a row rejected by embed is not counted again
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
    from mmbalance.operators import stats

    store.write_table("signatures", f"{shard_id}.parquet", table=stats.summarise(kept, ctx.tag_columns))
    for spec in ctx.recipe.metadata_labels():  # per-entry counts: sparse, merged by summing
        store.write_table("entries", spec.name, f"{shard_id}.parquet", table=entry_count_table(kept.column(entries_column(spec.name))))
    summary = {"shard_id": shard_id, "rows_in": tags.num_rows, "rows_out": kept.num_rows, "rejected": dups.num_rows,
               "reasons": {"duplicate uid": dups.num_rows} if dups.num_rows else {}}
    _mark_done(store, "signatures", shard_id, summary, task)
    return summary


# -- weigh: the solution applied, stochastic rounding, manifest --------------------------------


@functools.lru_cache(maxsize=4)
def _load_solution(out: str, digest: str):
    from mmbalance.operators.solve import solution_from_dict

    return solution_from_dict(RunStore(out).read_json("solve", "solution.json"))


@_timed
def weigh_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    from mmbalance.operators import stats, weigh

    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    solution = _load_solution(ctx.out, task["solution_digest"])
    tags = kept_tags(ctx, store, shard_id, task["dup_rows"])
    bases = getattr(solution, "embedding_sides", None)  # M4 embedding moments: weights need each row's z
    z = kept_projections(ctx, store, task, tags.column("row").to_numpy(), bases) if bases else None
    manifest = weigh.weigh_tags(tags, solution, ctx.recipe.export.seed, shard_id, task["relpath"], projected=z)
    weights = manifest.column("weight").to_numpy()
    repeats = manifest.column("repeats").to_numpy()
    store.write_table("manifest", f"{shard_id}.parquet", table=manifest)
    store.write_table("after", f"{shard_id}.parquet", table=stats.summarise(tags, ctx.tag_columns, weights, repeats))
    for spec in ctx.recipe.metadata_labels():
        store.write_table("after_entries", spec.name, f"{shard_id}.parquet",
                          table=entry_count_table(tags.column(entries_column(spec.name)), weights))
    summary = {
        "shard_id": shard_id,
        "rows_in": tags.num_rows,
        "rows_out": manifest.num_rows,
        "rejected": 0,
        "reasons": {},
        "weight_sum": float(weights.sum()),
        "repeats_sum": int(repeats.sum()),
    }
    if z is not None:  # exact embedding moments for the report, before and after
        summary["embedding_sums"] = solution.embedding_sums(tags, z, weights, repeats)
    _mark_done(store, "weigh", shard_id, summary, task)
    return summary


# -- assign: cluster and subclass ids from the fitted models ------------------------------------


@functools.lru_cache(maxsize=4)
def _load_models(out: str, digest: str):
    from mmbalance.pipeline.fit import load_models

    return load_models(RunStore(out))


@_timed
def assign_shard(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """Cluster/subclass ids of every valid row, aligned to the rows of the tags sidecar (null where
    a row has no embedding)."""
    import polars as pl

    from mmbalance.pipeline.fit import assign_table, assigned_schema

    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    models = _load_models(ctx.out, task["models_digest"])
    tags = store.read_table("tags", f"{shard_id}.parquet")
    valid_rows = tags.column("row").to_numpy()
    position = {int(r): i for i, r in enumerate(valid_rows)} if ctx.recipe.embed is not None else None
    parts, audits = [], []
    for rows, batch in embedding_batches(ctx, store, task, valid_rows):
        if position is None:  # source rows: the next slice of tags, in order
            lo = int(np.searchsorted(valid_rows, rows[0]))
            idx = np.arange(lo, lo + len(rows))
        else:
            idx = np.array([position[int(r)] for r in rows], np.int64)
        table, audit = assign_table(ctx, models, batch, tags.take(pa.array(idx)))
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
    summary = {"shard_id": shard_id, "rows_in": tags.num_rows, "rows_out": tags.num_rows, "rejected": 0, "reasons": {},
               "embedded": int(sum(p.num_rows for p in parts)), "audit": tag.merge_audits(audits)}
    _mark_done(store, "assign", shard_id, summary, task)
    return summary


def load_tags(ctx: RunContext, store: RunStore, shard_id: str) -> pa.Table:
    """The tags sidecar joined with assigned cluster/subclass tags (same rows, same order)."""
    tags = store.read_table("tags", f"{shard_id}.parquet")
    if not ctx.recipe.needs_derive():
        return tags
    assigned = store.read_table("assign", f"{shard_id}.parquet")
    if not tags.column("row").equals(assigned.column("row")):
        raise RuntimeError(f"shard {shard_id}: assign/ and tags/ rows differ")
    for name in assigned.column_names:
        if name != "row":
            tags = tags.append_column(name, assigned.column(name))
    return tags


# -- embed: open_clip (or DataComp .npz) embeddings of the valid rows ---------------------------


@functools.lru_cache(maxsize=2)
def _embed_bundle(spec_json: str):
    """One model per worker process (an actor in Ray): loading is the expensive part."""
    from mmbalance.operators.embed import load_model
    from mmbalance.schemas.embed import EmbedSpec

    spec = EmbedSpec.model_validate_json(spec_json)
    return load_model(spec, num_threads=spec.threads())


def embed_record(recipe: Recipe) -> dict[str, Any]:
    """What made the embeddings (model, weights hash, dim, versions): run.json and sidecar metadata."""
    spec = recipe.embed
    if spec.npz is not None:
        from mmbalance.operators.precomputed import npz_info

        return npz_info(spec.npz)
    from mmbalance.operators.embed import model_info

    return model_info(spec)


@_timed
def embed_shard_stage(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    from mmbalance.schemas.embed import sidecar_schema

    spec = ctx.recipe.embed
    store = RunStore(ctx.out)
    fs, _ = resolve_filesystem(ctx.input_uri)
    shard_id, relpath = task["shard_id"], task["relpath"]
    valid_rows = store.read_table("tags", f"{shard_id}.parquet", columns=["row"]).column("row").to_numpy()
    info = task["embed_info"]
    if spec.npz is not None:
        from mmbalance.operators.precomputed import npz_sidecar_batches

        batches = npz_sidecar_batches(fs, task["path"], relpath, spec.npz, ctx.recipe.input.columns.uid,
                                      ctx.recipe.execution.batch_rows, spec.on_image_error, spec.on_missing_caption,
                                      ctx.recipe.execution.verify_checksums)
    else:
        from mmbalance.operators.embed import EmbedColumns, embed_shard

        bundle = _embed_bundle(spec.model_dump_json())
        batches = embed_shard(fs, task["path"], relpath, bundle, EmbedColumns.from_recipe(ctx.recipe),
                              only_rows=valid_rows, verify_checksums=ctx.recipe.execution.verify_checksums)
    schema = sidecar_schema(int(info["embedding_dim"]), info)
    embedded = rejected = 0
    reasons: dict[str, int] = {}
    with store.table_writer("embeddings", f"{shard_id}.parquet", schema=schema) as out, \
            store.table_writer("rejects", "embed", f"{shard_id}.parquet", schema=REJECTS_SCHEMA) as rejects_out:
        for sidecar, rejects in batches:
            if spec.npz is not None:  # .npz rows cover the whole shard: keep the rows validation kept
                sidecar = sidecar.filter(pc.is_in(sidecar.column("row"), value_set=pa.array(valid_rows)))
                rejects = rejects.filter(pc.is_in(rejects.column("row"), value_set=pa.array(valid_rows)))
            out.write_table(sidecar.cast(schema))
            if rejects.num_rows:
                rejects_out.write_table(rejects)
                for reason in rejects.column("reason").to_pylist():
                    key = reason.split(" (")[0]
                    reasons[key] = reasons.get(key, 0) + 1
            embedded += sidecar.num_rows
            rejected += rejects.num_rows
    if embedded + rejected != len(valid_rows):
        raise RuntimeError(f"{relpath}: embedded {embedded} + rejected {rejected} != {len(valid_rows)} valid rows")
    summary = {"shard_id": shard_id, "rows_in": len(valid_rows), "rows_out": embedded, "rejected": rejected, "reasons": reasons}
    _mark_done(store, "embed", shard_id, summary, task)
    return summary


# -- the M4 streaming path: row blocks per shard, reduced once per dual evaluation --------------


def npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_npz(store: RunStore, *parts: str) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(store.read_bytes(*parts))) as data:
        return {k: data[k] for k in data.files}


def kept_projections(ctx: RunContext, store: RunStore, task: dict[str, Any], kept_rows: np.ndarray, bases) -> np.ndarray:
    """z (kept rows, sum of components) of a shard's kept rows: each side's embedding projected on
    its principal components, batch by batch as the embeddings are read (the solve's row blocks and
    the weigh stage both come here, so they compute the same z)."""
    from mmbalance.operators.solve.m4_rows import project_sides

    valid = store.read_table("tags", f"{task['shard_id']}.parquet", columns=["row"]).column("row").to_numpy()
    columns, dims = embedding_columns(ctx.recipe), dict(ctx.embedding_dims)
    names = {"image": SAMPLE_IMAGE, "text": SAMPLE_TEXT}
    parts, found = [], []
    for rows, table in embedding_batches(ctx, store, task, valid):
        keep = np.isin(rows, kept_rows)
        if keep.any():
            sub = table.filter(pa.array(keep))
            emb = {b.side: embedding_matrix(sub.column(columns[names[b.side]]), dims.get(columns[names[b.side]])) for b in bases}
            parts.append(project_sides(bases, emb, sub.num_rows))
            found.append(rows[keep])
    got = np.concatenate(found) if found else np.zeros(0, np.int64)
    if not np.array_equal(got, np.asarray(kept_rows)):
        raise RuntimeError(f"shard {task['shard_id']}: {len(kept_rows)} kept rows, embeddings found for {len(got)}")
    return np.concatenate(parts) if parts else np.zeros((0, sum(b.k for b in bases)), np.float32)


def stream_block_build(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """A shard's kept rows as its block under solve/stream/: (signature id, utility), or with
    ``rows_spec`` (M4 embedding moments) also the projected embeddings, class and prior weight."""
    import polars as pl

    from mmbalance.operators.solve.m4_stream import signature_ids
    from mmbalance.schemas.contract import UTILITY_COLUMN

    store = RunStore(ctx.out)
    shard_id = task["shard_id"]
    keys = pl.from_arrow(store.read_table("solve", "stream", "keys.parquet"))
    tags = kept_tags(ctx, store, shard_id, task["dup_rows"])
    if task.get("rows_spec"):
        from mmbalance.operators.solve.m4_rows import RowSpec, block_totals, row_block

        spec = RowSpec.from_files(store.read_json("solve", "stream", "spec.json"), read_npz(store, "solve", "stream", "spec.npz"))
        z = kept_projections(ctx, store, task, tags.column("row").to_numpy(), spec.bases)
        block = row_block(tags, keys, spec, z=z)
        store.write_bytes("solve", "stream", f"{shard_id}.npz", data=npz_bytes(**block))
        return {"shard_id": shard_id, **block_totals(block)}
    sig, u = signature_ids(tags.select(keys.columns + [UTILITY_COLUMN]), keys)
    store.write_bytes("solve", "stream", f"{shard_id}.npz", data=npz_bytes(sig=sig, u=u))
    return {"shard_id": shard_id, "rows": int(len(u)), "sum_u": float(u.sum())}


def stream_block_reduce(ctx: RunContext, task: dict[str, Any]) -> dict[str, Any]:
    """One shard's sums for one dual evaluation, written beside its block."""
    from mmbalance.operators.solve.m4_stream import reduce_block

    store = RunStore(ctx.out)
    block = read_npz(store, "solve", "stream", f"{task['shard_id']}.npz")
    payload = read_npz(store, "solve", "stream", task["t_file"]) if task["t_file"] else None
    part = reduce_block(block, task["kind"], payload, task["params"])
    name = f"part-{task['call']:06d}-{task['shard_id']}.npz"
    store.write_bytes("solve", "stream", name, data=npz_bytes(part=part))
    return {"shard_id": task["shard_id"], "part": name}
