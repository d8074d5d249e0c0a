"""Duplicate uids across the whole corpus, found without loading the corpus in one process.

Each shard writes its uid hashes sorted (``hash_uids``). The hash space is cut into buckets sized
to the corpus; a bucket task reads only the row groups of each shard whose hash range overlaps it,
finds repeated hashes, confirms them on the uid strings (hashes can collide) and keeps the first
occurrence by (shard order, row). Memory per task is bounded by the bucket, not the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("shard_index", pa.int64()),
        pa.field("row", pa.int64()),
        pa.field("uid", pa.string()),
        pa.field("first_shard_index", pa.int64()),
        pa.field("first_row", pa.int64()),
    ]
)

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_VECTOR_BYTES = 1024  # uid bytes hashed by numpy; the rest of longer uids by a compiled loop


def _fnv1a_continue(starts: np.ndarray, ends: np.ndarray, data: np.ndarray, h: np.ndarray) -> None:
    """FNV-1a over data[starts[i]:ends[i]] onto the running hashes h (in place), compiled on first
    use: only uids longer than _VECTOR_BYTES get here, and numba's compiler costs a worker ~100 MB."""
    global _fnv1a_continue_jit
    if _fnv1a_continue_jit is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kernel(starts, ends, data, h):
            for i in range(len(h)):
                x = h[i]
                for j in range(starts[i], ends[i]):
                    x = (x ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
                h[i] = x

        _fnv1a_continue_jit = kernel
    _fnv1a_continue_jit(starts, ends, data, h)


_fnv1a_continue_jit = None


def _fnv1a_splitmix(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """FNV-1a of each string, then the splitmix64 finaliser (FNV's low bits are weak, buckets use
    the high bits). Vectorised over strings one byte position at a time: rows sorted longest first,
    so the rows still going at position j are a prefix."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    starts = offsets[:-1][order]
    h = np.full(n, _FNV_OFFSET, np.uint64)
    steps = min(int(sorted_lengths[0]) if n else 0, _VECTOR_BYTES)
    going = np.searchsorted(-sorted_lengths, -np.arange(steps), side="left")  # rows longer than j
    for j in range(steps):
        head = h[: going[j]]
        head ^= data[starts[: going[j]] + j]
        head *= _FNV_PRIME  # uint64 arrays wrap, as FNV wants
    longer = int(np.count_nonzero(sorted_lengths > _VECTOR_BYTES))
    if longer:
        _fnv1a_continue(starts[:longer] + _VECTOR_BYTES, starts[:longer] + sorted_lengths[:longer], data, h[:longer])
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    out = np.empty(n, np.uint64)
    out[order] = h
    return out


def hash_uids(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hashes of uid strings (same value on every machine and version)."""
    arr = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    arr = pc.cast(arr, pa.large_string())
    if len(arr) == 0:
        return np.empty(0, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return _fnv1a_splitmix(offsets, data)


def bucket_bounds(num_buckets: int) -> list[tuple[int, int]]:
    """Inclusive [lo, hi] uint64 hash ranges of equal width covering the whole space."""
    edges = [(2**64 * b) // num_buckets for b in range(num_buckets + 1)]
    return [(edges[b], edges[b + 1] - 1) for b in range(num_buckets)]


def find_duplicates(shard_index: np.ndarray, row: np.ndarray, uid_hash: np.ndarray, fetch_uids) -> pa.Table:
    """Rows whose uid occurred earlier (by shard_index, row). ``fetch_uids(shard_index, rows)`` returns
    the uid strings of candidate rows so hash collisions are never reported as duplicates."""
    if len(uid_hash) == 0:
        return DUPLICATES_SCHEMA.empty_table()
    order = np.lexsort((row, shard_index, uid_hash))
    h = uid_hash[order]
    repeated = np.zeros(len(h), bool)
    same_as_prev = h[1:] == h[:-1]
    repeated[1:] |= same_as_prev
    repeated[:-1] |= same_as_prev
    if not repeated.any():
        return DUPLICATES_SCHEMA.empty_table()
    cand = order[repeated]
    cand_shard, cand_row = shard_index[cand], row[cand]
    uids = np.empty(len(cand), dtype=object)
    for s in np.unique(cand_shard):
        sel = np.flatnonzero(cand_shard == s)
        uids[sel] = fetch_uids(int(s), cand_row[sel])
    # candidates stay sorted by (hash, shard, row): the first of each uid is the keeper
    first_of: dict[str, tuple[int, int]] = {}
    out_shard, out_row, out_uid, out_fs, out_fr = [], [], [], [], []
    for s, r, u in zip(cand_shard.tolist(), cand_row.tolist(), uids.tolist()):
        if u in first_of:
            fs, fr = first_of[u]
            out_shard.append(s)
            out_row.append(r)
            out_uid.append(u)
            out_fs.append(fs)
            out_fr.append(fr)
        else:
            first_of[u] = (s, r)
    return pa.table(
        {"shard_index": out_shard, "row": out_row, "uid": out_uid, "first_shard_index": out_fs, "first_row": out_fr},
        schema=DUPLICATES_SCHEMA,
    )
