"""Bottom-k samples by the seeded uid priority (``hashing.sample_priority``): k rows overall or up to a
cap per stratum, the same whatever the shard split, so per-shard selections merge exactly in
bounded memory (the SBCL fit sample of a scan-time label is selected this way from the tags)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.arrays import one_array

SAMPLE_UID, SAMPLE_PRIORITY, SAMPLE_STRATUM = "uid", "priority", "stratum"


def select_bottom_k(table: pa.Table, k: int | None, per_stratum: int | dict[str, int] | None) -> pa.Table:
    """Rows with the smallest (priority, uid), k overall or per stratum, in that canonical order.

    The result depends only on the set of rows, never on their order or on how they were split,
    so selecting from a union of selections equals selecting from the union (exact merge). The
    canonical order matters too: faiss's own subsampling and initialisation depend on row order.
    Only the key columns are sorted; the embedding column is copied once, by the final take.
    """
    keys = [(SAMPLE_PRIORITY, "ascending"), (SAMPLE_UID, "ascending")]
    prio = table.column(SAMPLE_PRIORITY).to_numpy()
    cand = np.arange(table.num_rows)
    if per_stratum is None:
        if k is not None and table.num_rows > k:
            # cheap pre-filter on priority alone; ties at the boundary are kept for the exact sort
            cand = np.flatnonzero(prio <= np.partition(prio, k - 1)[k - 1])
        order = pc.sort_indices(table.select([SAMPLE_PRIORITY, SAMPLE_UID]).take(pa.array(cand)), sort_keys=keys)
        return table.take(pa.array(cand[order.to_numpy()[: k if k is not None else len(cand)]]))
    key_table = table.select([SAMPLE_STRATUM, SAMPLE_PRIORITY, SAMPLE_UID])
    # nulls sort last: the null stratum is one group like any other
    order = pc.sort_indices(key_table, sort_keys=[(SAMPLE_STRATUM, "ascending"), *keys]).to_numpy()
    if len(order) == 0:
        return table
    codes = pc.dictionary_encode(one_array(key_table.column(SAMPLE_STRATUM)).take(pa.array(order)),
                                 null_encoding="encode")
    idx = codes.indices.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    rank = np.arange(len(idx)) - np.repeat(starts, np.diff(np.r_[starts, len(idx)]))
    if isinstance(per_stratum, dict):
        caps = np.array([per_stratum.get(name, 0) for name in codes.dictionary.to_pylist()], np.int64)
        cap = caps[idx]
    else:
        cap = np.int64(per_stratum)
    kept = order[rank < cap]
    # final canonical order by priority (strata interleaved), so a capped sample is also uniform-looking
    final = pc.sort_indices(key_table.select([SAMPLE_PRIORITY, SAMPLE_UID]).take(pa.array(kept)), sort_keys=keys)
    return table.take(pa.array(kept[final.to_numpy()]))


def merge_samples(
    samples: Iterable[pa.Table], *, k: int | None = None, per_stratum: int | dict[str, int] | None = None
) -> pa.Table:
    """Merge per-shard samples taken with the same seed and size: exactly the sample of the union."""
    merged = None
    for s in samples:
        if s.num_rows == 0:
            continue
        merged = s if merged is None else select_bottom_k(pa.concat_tables([merged, s]), k, per_stratum)
    if merged is None:
        raise ValueError("no non-empty sample to merge")
    return select_bottom_k(merged, k, per_stratum)
