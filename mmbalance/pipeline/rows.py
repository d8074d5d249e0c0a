"""Reading a shard's rows: source batches, embedding columns, row selections, the kept rows (valid,
first occurrence, embedded) and their projections. Below the stages (pipeline/stages/) and the fit
(pipeline/fit.py), which both use it, so neither imports the other's module to read rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbalance.io.source import read_source
from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.schemas.recipe import Recipe

if TYPE_CHECKING:
    from mmbalance.pipeline.shards import Shard
    from mmbalance.pipeline.stage import RunContext

SAMPLE_IMAGE, SAMPLE_TEXT = "image_emb", "text_emb"  # embedding columns of the fit sample


def embedding_columns(recipe: Recipe) -> dict[str, str]:
    """Embedding columns by sample-table name, in the source shards or (with ``embed``) the sidecar."""
    if recipe.embed is not None:
        return {SAMPLE_IMAGE: SAMPLE_IMAGE, SAMPLE_TEXT: SAMPLE_TEXT}
    cols = recipe.input.columns
    out = {}
    if cols.image_embedding:
        out[SAMPLE_IMAGE] = cols.image_embedding
    if cols.text_embedding:
        out[SAMPLE_TEXT] = cols.text_embedding
    return out


def drop_rows(tags: pa.Table, rows) -> tuple[pa.Table, pa.Table]:
    if len(rows) == 0:
        return tags, tags.slice(0, 0)
    hit = pc.is_in(tags.column("row"), value_set=pa.array(rows, pa.int64()))
    return tags.filter(pc.invert(hit)), tags.filter(hit)


def embedding_batches(ctx: RunContext, store: RunStore, shard: Shard, valid_rows: np.ndarray):
    """(rows, table of embedding columns) for the valid rows of a shard, in row order: from the
    source shard, or from the embeddings sidecar (which lacks the rows the embed stage rejected)."""
    columns = list(embedding_columns(ctx.recipe).values())
    if ctx.recipe.embed is not None:
        sidecar = pq.ParquetFile(store.fs.open_input_file(store.path("embeddings", f"{shard.shard_id}.parquet")))
        for batch in sidecar.iter_batches(batch_size=ctx.recipe.execution.batch_rows, columns=["row", *columns]):
            table = pa.Table.from_batches([batch])
            yield table.column("row").to_numpy(), table.select(columns)
        return
    fs, _ = resolve_filesystem(ctx.input_uri)
    offset, start = 0, 0
    for table in read_source(fs, shard.path, shard.relpath, columns, ctx.recipe.execution.batch_rows,
                             ctx.recipe.input.format, ctx.recipe.execution.verify_checksums):
        rows = np.arange(start, start + table.num_rows)
        start += table.num_rows
        # valid rows are ascending, so each batch's valid rows are the next slice of them
        stop = offset + int(np.searchsorted(valid_rows[offset:], rows[-1], side="right")) if len(rows) else offset
        mine = valid_rows[offset:stop]
        offset = stop
        if len(mine):
            yield mine, table.take(pa.array(mine - rows[0]))


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


def embed_rejected_rows(ctx: RunContext, store: RunStore, shard_id: str) -> np.ndarray:
    """Rows the embed stage rejected (undecodable images, ...): out of the manifest like duplicates."""
    if ctx.recipe.embed is None or not store.exists("rejects", "embed", f"{shard_id}.parquet"):
        return np.zeros(0, np.int64)
    return store.read_table("rejects", "embed", f"{shard_id}.parquet", columns=["row"]).column("row").to_numpy()


def kept_tags(ctx: RunContext, store: RunStore, shard_id: str, dup_rows) -> pa.Table:
    """A shard's tags without its duplicates and the rows the embed stage rejected: the manifest's rows."""
    dropped = np.concatenate([np.asarray(dup_rows, np.int64), embed_rejected_rows(ctx, store, shard_id)])
    return drop_rows(load_tags(ctx, store, shard_id), dropped)[0]


def kept_projections(ctx: RunContext, store: RunStore, shard: Shard, kept_rows: np.ndarray, bases) -> np.ndarray:
    """z (kept rows, sum of components) of a shard's kept rows: each side's embedding projected on
    its principal components, batch by batch as the embeddings are read (the solve's row blocks and
    the weigh stage both come here, so they compute the same z)."""
    from mmbalance.operators.arrays import embedding_matrix
    from mmbalance.operators.solve.m4.rows import project_sides

    valid = store.read_table("tags", f"{shard.shard_id}.parquet", columns=["row"]).column("row").to_numpy()
    columns, dims = embedding_columns(ctx.recipe), dict(ctx.embedding_dims)
    names = {"image": SAMPLE_IMAGE, "text": SAMPLE_TEXT}
    parts, found = [], []
    for rows, table in embedding_batches(ctx, store, shard, valid):
        keep = np.isin(rows, kept_rows)
        if keep.any():
            sub = table.filter(pa.array(keep))
            emb = {b.side: embedding_matrix(sub.column(columns[names[b.side]]), dims.get(columns[names[b.side]])) for b in bases}
            parts.append(project_sides(bases, emb, sub.num_rows))
            found.append(rows[keep])
    got = np.concatenate(found) if found else np.zeros(0, np.int64)
    if not np.array_equal(got, np.asarray(kept_rows)):
        raise RuntimeError(f"shard {shard.shard_id}: {len(kept_rows)} kept rows, embeddings found for {len(got)}")
    return np.concatenate(parts) if parts else np.zeros((0, sum(b.k for b in bases)), np.float32)


def npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_npz(store: RunStore, *parts: str) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(store.read_bytes(*parts))) as data:
        return {k: data[k] for k in data.files}
