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
    summed: dict[str, pl.Expr] = {}  # output column -> per-row value
    if UTILITY_COLUMN in frame.columns:
        summed["utility_sum"] = pl.col(UTILITY_COLUMN)
    if weights is not None:
        frame = frame.with_columns(pl.Series("w", weights, dtype=pl.Float64))
        summed |= {"w_sum": pl.col("w"), "w2_sum": pl.col("w") ** 2}
    maxed = {}
    if repeats is not None:
        frame = frame.with_columns(pl.Series("rep", repeats, dtype=pl.Int64))
        summed |= {"rep_sum": pl.col("rep"), "rep2_sum": pl.col("rep") ** 2, "kept": (pl.col("rep") > 0).cast(pl.Int64)}
        maxed = {"rep_max": pl.col("rep")}
    # __row: a column even with no tags and no weights, so the rows are still counted
    values = frame.select(*tag_columns, *(e.alias(n) for n, e in (summed | maxed).items()), pl.repeat(0, pl.len(), dtype=pl.Int8).alias("__row"))
    out = group_totals(values, tag_columns, list(summed), list(maxed), count="count")
    order = [*tag_columns, "count", *(c for c in ("utility_sum", "w_sum", "w2_sum", "rep_sum", "rep2_sum", "rep_max", "kept") if c in out.columns)]
    return _sorted(out.select(order), tag_columns).to_arrow()


def group_totals(frame: pl.DataFrame, keys: list[str], sums: list[str], maxes: list[str] = (),
                 count: str | None = None) -> pl.DataFrame:
    """Per combination of ``keys``: the sum of each of ``sums``, the max of ``maxes`` and (as
    ``count``) the rows, under the same names. Arrow's single-threaded hash aggregation adds each
    group's floats in row order, so the sums have the same bits on every run; polars' parallel
    group-by adds them in no fixed order (a rerun's after/ tables and report differed in the last bit)."""
    aggs = [(c, "sum") for c in sums] + [(c, "max") for c in maxes] + ([([], "count_all")] if count else [])
    names = list(sums) + list(maxes) + ([count] if count else [])
    if not keys:
        table = frame.to_arrow()
        return pl.DataFrame({n: [_reduce(table, a)] for n, a in zip(names, aggs)},
                            schema={n: (pl.Int64 if n == count else frame.schema[n]) for n in names})
    out = frame.to_arrow().group_by(keys, use_threads=False).aggregate(aggs)
    found = {f"{c}_{how}" if c else how: n for (c, how), n in zip(aggs, names)}
    out = out.rename_columns([found.get(c, c) for c in out.column_names])
    result = pl.from_arrow(out)
    return result.with_columns(pl.col(c).cast(frame.schema[c]) for c in keys) if isinstance(result, pl.DataFrame) else result.to_frame()


def _reduce(table: pa.Table, agg: tuple) -> object:
    import pyarrow.compute as pc

    column, how = agg
    if how == "count_all":
        return table.num_rows
    value = getattr(pc, how)(table.column(column)).as_py()
    return 0 if value is None and how == "sum" else value


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
    out = group_totals(frame, tag_columns, [c for c in value_columns if c not in MAX_COLUMNS],
                       [c for c in value_columns if c in MAX_COLUMNS])
    return _sorted(out.select(frame.columns), tag_columns).to_arrow()


def vocabulary(merged: pa.Table, column: str) -> list[str]:
    """Distinct non-null values of a tag column, sorted (labels are one-hot over the values seen)."""
    values = merged.column(column).drop_null().unique().to_pylist()
    return sorted(values)
