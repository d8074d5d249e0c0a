"""Signature statistics: rows grouped by their tag values, with counts and weighted sums.

A signature is one combination of attribute and label values. Every global step (solving,
reporting) reads these small tables, merged across shards by a plain sum, never the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl
import pyarrow as pa

from mmbalance.operators.arrays import one_array
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
    if tag_columns and all(_plain_key(tags.schema.field(c).type) for c in tag_columns):
        return _summarise_arrow(tags, tag_columns, weights, repeats)
    return _summarise_polars(tags, tag_columns, weights, repeats)


def _summarise_polars(tags: pa.Table, tag_columns: list[str], weights: np.ndarray | None,
                      repeats: np.ndarray | None) -> pa.Table:
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


def _plain_key(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)


def _summarise_arrow(tags: pa.Table, tag_columns: list[str], weights: np.ndarray | None,
                     repeats: np.ndarray | None) -> pa.Table:
    """``summarise`` without polars, for string and integer tags (every run's case): the same table
    to the bit (each group's floats added in row order, as Arrow's single-threaded aggregation adds
    them; strings large_string, as polars gives them back) in half the time on a 25k-row shard,
    which went mostly to three conversions between Arrow and polars."""
    codes, first = _group_codes(tags, tag_columns)
    groups = len(first)
    out: dict[str, pa.Array] = {}
    for name in tag_columns:
        key = one_array(tags.column(name)).take(pa.array(first))
        out[name] = key.cast(pa.large_string()) if pa.types.is_string(key.type) else key
    out["count"] = pa.array(np.bincount(codes, minlength=groups).astype(np.int64))
    if UTILITY_COLUMN in tags.column_names:
        out["utility_sum"] = _group_sum(one_array(tags.column(UTILITY_COLUMN)).cast(pa.float64()), codes, groups)
    if weights is not None:
        w = np.asarray(weights, np.float64)
        out["w_sum"] = _group_sum(pa.array(w), codes, groups)
        out["w2_sum"] = _group_sum(pa.array(w * w), codes, groups)
    if repeats is not None:
        rep = np.asarray(repeats, np.int64)
        out["rep_sum"] = _group_sum(pa.array(rep), codes, groups)
        out["rep2_sum"] = _group_sum(pa.array(rep * rep), codes, groups)
        out["rep_max"] = _group_max(pa.array(rep), codes, groups)
        out["kept"] = _group_sum(pa.array((rep > 0).astype(np.int64)), codes, groups)
    table = pa.table(out)
    return table.take(_sort_indices(table, tag_columns))


def _sort_indices(table: pa.Table, columns: list[str]) -> pa.Array:
    """Ascending by ``columns``, nulls last: the order ``_sorted`` gives."""
    import pyarrow.compute as pc

    if int(pa.__version__.split(".")[0]) < 25:  # a null placement per key came in pyarrow 25
        return pc.sort_indices(table, sort_keys=[(c, "ascending") for c in columns], null_placement="at_end")
    return pc.sort_indices(table, sort_keys=[(c, "ascending", "at_end") for c in columns])


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


def _group_codes(table: pa.Table, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(group index per row, each group's first row); a null key is a value like any other."""
    import pyarrow.compute as pc

    code = np.zeros(table.num_rows, np.int64)
    size = 1
    for key in keys:
        encoded = pc.dictionary_encode(one_array(table.column(key)), null_encoding="encode")
        values = len(encoded.dictionary)
        if size * values >= 2**62:  # renumber densely before the combined code could overflow
            _, code = np.unique(code, return_inverse=True)
            size = int(code.max()) + 1 if len(code) else 1
        code = code * values + encoded.indices.to_numpy(zero_copy_only=False)
        size *= values
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    return inverse.reshape(-1), first


def _group_sum(values: pa.Array, codes: np.ndarray, groups: int) -> pa.Array:
    """Per group, the sum of its non-null values in row order (null: no such value), typed as
    Arrow's sum (int64, uint64, float64)."""
    kind = values.type
    valid = values.is_valid().to_numpy(zero_copy_only=False) if values.null_count else None
    if valid is not None:
        codes = codes[valid]
        values = values.drop_null()
    if pa.types.is_floating(kind):
        sums = np.bincount(codes, weights=values.to_numpy(zero_copy_only=False).astype(np.float64), minlength=groups)
    else:
        sums = np.zeros(groups, np.uint64 if pa.types.is_unsigned_integer(kind) else np.int64)
        np.add.at(sums, codes, values.to_numpy(zero_copy_only=False).astype(sums.dtype))
    present = np.bincount(codes, minlength=groups) > 0 if valid is not None else None
    return pa.array(sums, mask=None if present is None else ~present)


def _group_max(values: pa.Array, codes: np.ndarray, groups: int) -> pa.Array:
    """Per group, the largest non-null value (null: no such value), in the values' type."""
    if values.null_count:
        codes = codes[values.is_valid().to_numpy(zero_copy_only=False)]
        values = values.drop_null()
    x = values.to_numpy(zero_copy_only=False)
    low = np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.integer) else -np.inf
    top = np.full(groups, low, x.dtype)
    np.maximum.at(top, codes, x)
    present = np.bincount(codes, minlength=groups) > 0
    return pa.array(top, type=values.type, mask=~present)


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
