"""Duplicate uids across the whole corpus, found without loading the corpus in one process.

Each shard writes its uid hashes sorted (``hashing.hash_uids``). The hash space is cut into buckets sized
to the corpus; a bucket task reads only the row groups of each shard whose hash range overlaps it,
finds repeated hashes, confirms them on the uid strings (hashes can collide) and keeps the first
occurrence by (shard order, row). Memory per task is bounded by the bucket, not the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("shard_index", pa.int64()),
        pa.field("row", pa.int64()),
        pa.field("uid", pa.string()),
        pa.field("first_shard_index", pa.int64()),
        pa.field("first_row", pa.int64()),
    ]
)

def bucket_bounds(num_buckets: int) -> list[tuple[int, int]]:
    """Inclusive [lo, hi] uint64 hash ranges of equal width covering the whole space."""
    edges = [(2**64 * b) // num_buckets for b in range(num_buckets + 1)]
    return [(edges[b], edges[b + 1] - 1) for b in range(num_buckets)]


def find_duplicates(shard_index: np.ndarray, row: np.ndarray, uid_hash: np.ndarray, fetch_uids) -> pa.Table:
    """Rows whose uid occurred earlier (by shard_index, row). ``fetch_uids(shard_index, rows)`` returns
    the uid strings of candidate rows so hash collisions are never reported as duplicates."""
    if len(uid_hash) == 0:
        return DUPLICATES_SCHEMA.empty_table()
    # equal hashes side by side: one plain sort of the hashes (a bucket holds ~1M rows; ordering every
    # row by (hash, shard, row) took 3 stable sorts, 2/3 of the dedup stage), then the few rows whose
    # hash repeats ordered by (hash, shard, row)
    order = np.argsort(uid_hash)
    h = uid_hash[order]
    repeated = np.zeros(len(h), bool)
    same_as_prev = h[1:] == h[:-1]
    repeated[1:] |= same_as_prev
    repeated[:-1] |= same_as_prev
    if not repeated.any():
        return DUPLICATES_SCHEMA.empty_table()
    cand = order[repeated]
    cand = cand[np.lexsort((row[cand], shard_index[cand], uid_hash[cand]))]
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
