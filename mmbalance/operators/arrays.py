"""Embedding columns as matrices and unit-norm rows: plain array helpers shared by the scan stage,
the fit, clustering, zero-shot tagging and the leakage probes. Below all of them (no faiss, no
torch), so a scan worker never imports the clustering package."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def one_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one Arrow array: combine_chunks copies even a single chunk, and a batch read
    from Parquet is almost always one chunk."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float16/float32 matrix of a list or fixed_size_list column and a mask of non-null rows.

    A single-chunk fixed_size_list without null values is a zero-copy view of Arrow's buffer;
    null rows of a variable-size list are zero-filled, a non-null row of the wrong length is an error.
    """
    arr = one_array(column)
    n = len(arr)
    valid = ~arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, bool)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        flat = arr.values.slice(arr.offset * d, n * d)
        if flat.null_count:  # null child values: those rows are unusable
            child_null = flat.is_null().to_numpy(zero_copy_only=False).reshape(n, d).any(axis=1)
            valid &= ~child_null
            flat = flat.fill_null(0)
        return flat.to_numpy(zero_copy_only=False).reshape(n, d), valid
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"embedding column must be a list or fixed_size_list of floats, got {arr.type}")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    seen = np.unique(lengths[valid])
    d = int(seen[0]) if len(seen) else dim
    if d is None:  # no non-null row (or no row): nothing to decode, every row unusable
        return np.zeros((n, 0), np.float32), valid
    if len(seen) > 1 or (dim is not None and d != dim):
        raise ValueError(f"embedding rows have lengths {seen.tolist()}, expected one length{f' {dim}' if dim else ''}")
    flat = arr.flatten()  # skips null rows
    if flat.null_count:
        flat = flat.fill_null(float("nan"))  # NaN marks the row unusable in unit_rows
    values = flat.to_numpy(zero_copy_only=False).reshape(-1, d)
    if valid.all():
        return values, valid
    out = np.zeros((n, d), values.dtype)
    out[valid] = values
    return out, valid


def fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A matrix as an Arrow fixed_size_list column (zero-copy for a contiguous float matrix)."""
    m = np.ascontiguousarray(matrix)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def unit_rows(matrix: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Float32 copy of ``matrix`` with unit-norm rows; rows with NaN/inf or zero norm become unusable
    (zeros in the output, False in the mask)."""
    x = np.array(matrix, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    ok = np.isfinite(norms) & (norms > 0)
    if valid is not None:
        ok &= valid
    x[~ok] = 0.0
    x /= np.where(ok, norms, 1.0)[:, None].astype(np.float32)
    return x, ok
