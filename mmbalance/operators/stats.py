"""Signature statistics: rows grouped by their tag values, with counts and weighted sums.

A signature is one combination of attribute and label values. Every global step (solving,
reporting) reads these small tables, merged across shards by a plain sum, never the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from mmbalance.schemas.contract import UTILITY_COLUMN

# sum-merged columns; anything else but the tag columns is max-merged
SUM_COLUMNS = ("count", "utility_sum", "w_sum", "w2_sum", "rep_sum", "rep2_sum", "kept")
MAX_COLUMNS = ("rep_max",)


def summarise(
    tags: pa.Table,
    tag_columns: list[str],
    weights: np.ndarray | None = None,
    repeats: np.ndarray | None = None,
) -> pa.Table:
    """Group one table of tags by signature. With weights/repeats, also their sums (the "after" view)."""
    frame = pl.from_arrow(tags.select(tag_columns + ([UTILITY_COLUMN] if UTILITY_COLUMN in tags.column_names else [])))
    if isinstance(frame, pl.Series):  # pragma: no cover - from_arrow of a 1-column table
        frame = frame.to_frame()
    aggs = [pl.len().cast(pl.Int64).alias("count")]
    if UTILITY_COLUMN in frame.columns:
        aggs.append(pl.col(UTILITY_COLUMN).sum().alias("utility_sum"))
    if weights is not None:
        frame = frame.with_columns(pl.Series("w", weights, dtype=pl.Float64))
        aggs += [pl.col("w").sum().alias("w_sum"), (pl.col("w") ** 2).sum().alias("w2_sum")]
    if repeats is not None:
        frame = frame.with_columns(pl.Series("rep", repeats, dtype=pl.Int64))
        aggs += [
            pl.col("rep").sum().alias("rep_sum"),
            (pl.col("rep") ** 2).sum().alias("rep2_sum"),
            pl.col("rep").max().alias("rep_max"),
            (pl.col("rep") > 0).sum().cast(pl.Int64).alias("kept"),
        ]
    if not tag_columns:
        out = frame.select(aggs)
    else:
        out = frame.group_by(tag_columns).agg(aggs)
    return _sorted(out, tag_columns).to_arrow()


def _sorted(frame: pl.DataFrame, tag_columns: list[str]) -> pl.DataFrame:
    # deterministic row order: merged files must be byte-identical across reruns
    return frame.sort(tag_columns, nulls_last=True) if tag_columns else frame


def merge(tables: Iterable[pa.Table], tag_columns: list[str]) -> pa.Table:
    """Sum per-shard signature tables into one."""
    tables = list(tables)
    frames = [pl.from_arrow(t) for t in tables if t.num_rows]
    if not frames:  # keep the columns, e.g. w_sum of an all-rejected corpus
        return tables[0] if tables else pa.table({c: pa.array([], pa.string()) for c in tag_columns} | {"count": pa.array([], pa.int64())})
    frame = pl.concat(frames, how="vertical_relaxed")
    value_columns = [c for c in frame.columns if c not in tag_columns]
    aggs = [pl.col(c).max() if c in MAX_COLUMNS else pl.col(c).sum() for c in value_columns]
    out = frame.group_by(tag_columns).agg(aggs) if tag_columns else frame.select(aggs)
    return _sorted(out, tag_columns).to_arrow()


def merge_sparse_counts(tables: Iterable[pa.Table], size: int) -> np.ndarray:
    """Sum per-shard sparse (entry_id, count) tables into one dense vector of ``size`` entries."""
    total = np.zeros(size, np.float64)
    for t in tables:
        if t.num_rows:
            np.add.at(total, t.column("entry_id").to_numpy(), t.column("count").to_numpy().astype(np.float64))
    return total


def vocabulary(merged: pa.Table, column: str) -> list[str]:
    """Distinct non-null values of a tag column, sorted (labels are one-hot over the values seen)."""
    values = merged.column(column).drop_null().unique().to_pylist()
    return sorted(values)
