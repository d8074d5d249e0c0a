"""Weigh and resample: weights from the solution, then seeded unbiased stochastic rounding.

repeats = floor(w) + [u < w - floor(w)] with u uniform in [0, 1), so E[repeats] = w. u comes from a
counter-based hash of (seed, shard id, row): the same row gets the same draw whatever the batch
size, worker or execution order, which makes reruns byte-identical.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from mmbalance.schemas.contract import MANIFEST_SCHEMA

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shard_key(seed: int, shard_id: str) -> np.uint64:
    digest = hashlib.sha256(f"{seed}\0{shard_id}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def uniforms(key: np.uint64, rows: np.ndarray) -> np.ndarray:
    """u in [0, 1) per row, a pure function of (key, row)."""
    with np.errstate(over="ignore"):
        bits = _splitmix64(rows.astype(np.uint64) * _GOLDEN ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def stochastic_round(weights: np.ndarray, key: np.uint64, rows: np.ndarray) -> np.ndarray:
    base = np.floor(weights)
    extra = uniforms(key, rows) < (weights - base)
    return (base + extra).astype(np.int32)


def manifest_table(uids: pa.Array, weights: np.ndarray, repeats: np.ndarray, shard: str, rows: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "uid": uids,
            "weight": pa.array(weights, pa.float64()),
            "repeats": pa.array(repeats, pa.int32()),
            "shard": pa.array([shard] * len(rows), pa.string()) if len(rows) else pa.array([], pa.string()),
            "row": pa.array(rows, pa.int64()),
        },
        schema=MANIFEST_SCHEMA,
    )


def weigh_tags(tags: pa.Table, solution, seed: int, shard_id: str, shard: str, projected: np.ndarray | None = None) -> pa.Table:
    """Plain-function form: a tags table in, its manifest rows out (``projected``: the rows'
    embeddings on the principal components, for a solution with embedding moments)."""
    weights = solution.weights(tags) if projected is None else solution.weights(tags, projected=projected)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"{shard}: solution '{solution.method}' produced a negative or non-finite weight")
    rows = tags.column("row").to_numpy()
    repeats = stochastic_round(weights, shard_key(seed, shard_id), rows)
    return manifest_table(tags.column("uid").combine_chunks(), weights, repeats, shard, rows)
