"""Reading a shard's rows: source batches, embedding columns, row selections. Below the stages
(pipeline/stages.py) and the fit (pipeline/fit.py), which both use it, so neither imports the other's
module to read rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbalance.io.source import read_source
from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.schemas.recipe import Recipe

if TYPE_CHECKING:
    from mmbalance.pipeline.stages import RunContext

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


def embedding_batches(ctx: RunContext, store: RunStore, task: dict[str, Any], valid_rows: np.ndarray):
    """(rows, table of embedding columns) for the valid rows of a shard, in row order: from the
    source shard, or from the embeddings sidecar (which lacks the rows the embed stage rejected)."""
    columns = list(embedding_columns(ctx.recipe).values())
    if ctx.recipe.embed is not None:
        sidecar = pq.ParquetFile(store.fs.open_input_file(store.path("embeddings", f"{task['shard_id']}.parquet")))
        for batch in sidecar.iter_batches(batch_size=ctx.recipe.execution.batch_rows, columns=["row", *columns]):
            table = pa.Table.from_batches([batch])
            yield table.column("row").to_numpy(), table.select(columns)
        return
    fs, _ = resolve_filesystem(ctx.input_uri)
    offset, start = 0, 0
    for table in read_source(fs, task["path"], task["relpath"], columns, ctx.recipe.execution.batch_rows,
                             ctx.recipe.input.format, ctx.recipe.execution.verify_checksums):
        rows = np.arange(start, start + table.num_rows)
        start += table.num_rows
        # valid rows are ascending, so each batch's valid rows are the next slice of them
        stop = offset + int(np.searchsorted(valid_rows[offset:], rows[-1], side="right")) if len(rows) else offset
        mine = valid_rows[offset:stop]
        offset = stop
        if len(mine):
            yield mine, table.take(pa.array(mine - rows[0]))
