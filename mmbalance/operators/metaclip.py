"""MetaCLIP balancing over metadata entries (docs/algorithms.md section 4), its arithmetic in one place.

A caption matches many entries (``MetadataMatcher``: the entry ids per row, whole-word matching of
``phrases``). Counts are
per entry and shard, stored sparse (a shard matches few of 500k entries) and merged by summing;
entry e keeps a row with p_e = t / max(c_e, t), and a row matching entries E is kept with
1 - prod_{e in E} (1 - p_e): a tail entry (p_e = 1) keeps it for sure. The same cap over the values
of a hard tag (one value a row) is p_v = t / max(c_v, t).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import load_lines
from mmbalance.operators.arrays import one_array
from mmbalance.operators.phrases import PhraseMatcher, uncovered


class MetadataMatcher:
    """A user's entry list matched in captions: multi-hot entry ids per caption, counts per shard.

    Entry ids are 0-based positions in the list (blank lines skipped by ``from_file``). As in
    MetaCLIP every occurrence counts, including entries inside longer ones ("new york" and "york"
    in "new york city") unless ``longest_only``. Entries that normalise alike ("t-shirt",
    "t shirt") all fire together.
    """

    def __init__(self, entries: Sequence[str], longest_only: bool = False):
        self.entries = list(entries)
        self.longest_only = longest_only
        self.matcher = PhraseMatcher(self.entries)

    @classmethod
    def from_file(cls, path, longest_only: bool = False) -> "MetadataMatcher":
        return cls(load_lines(path), longest_only)

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def match(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ListArray:
        """list<int32> per caption: the distinct entry ids it matches, ascending (empty if none)."""
        enc = self.matcher.encode(captions)
        m = self.matcher.find(enc)
        if self.longest_only:
            m = m.take(uncovered(m.start, m.length, np.zeros(len(m.start), np.int64), len(enc.ids)))
        t_off, t_ids = self.matcher.terminal_offsets, self.matcher.terminal_phrases
        lo, hi = t_off[m.node], t_off[m.node + 1]
        reps = hi - lo
        row = np.repeat(m.row, reps)
        entry = t_ids[np.repeat(lo - np.concatenate([[0], np.cumsum(reps)[:-1]]), reps) + np.arange(reps.sum())]
        pairs = np.unique(row * max(self.num_entries, 1) + entry)
        n = enc.num_rows
        rows = pairs // max(self.num_entries, 1)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        values = (pairs % max(self.num_entries, 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def entry_count_table(entries: pa.ChunkedArray | pa.Array, weights: np.ndarray | None = None) -> pa.Table:
    """Sparse (entry_id, count) of a multi-hot column (list<int32> entry ids per row); with
    ``weights``, the weight of the rows matching each entry (a float count)."""
    arr = one_array(entries)
    ids = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    w = None if weights is None else np.asarray(weights, np.float64)[pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)]
    size = int(ids.max()) + 1 if len(ids) else 0
    counts = np.bincount(ids, weights=w, minlength=size)
    nz = np.flatnonzero(counts)
    count = pa.array(counts[nz], pa.float64() if weights is not None else pa.int64())
    return pa.table({"entry_id": pa.array(nz, pa.int32()), "count": count})


def merge_entry_counts(tables: Iterable[pa.Table], size: int) -> np.ndarray:
    """Per-shard sparse (entry_id, count) tables summed into one dense float64 vector of ``size`` entries."""
    total = np.zeros(size, np.float64)
    for t in tables:
        if t.num_rows:
            np.add.at(total, t.column("entry_id").to_numpy(), t.column("count").to_numpy().astype(np.float64))
    return total


def keep_rate(count: float, cap: float) -> float:
    """p = t / max(c, t): a head entry (or value) is thinned to about ``cap`` expected rows."""
    return cap / max(count, cap)


def capped_entries(counts: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """The entries over the cap and their p_e = t / c_e (every other entry keeps its rows: p_e = 1)."""
    capped = np.flatnonzero(counts > cap)
    return capped, cap / counts[capped].astype(np.float64)


def keep_probability(entries: pa.ListArray | pa.ChunkedArray, capped_ids: np.ndarray, capped_p: np.ndarray,
                     unmatched: float) -> np.ndarray:
    """Per row 1 - prod_{e in E} (1 - p_e) over the entries E it matches (p_e from the capped
    entries, 1 for the rest); ``unmatched`` for a row that matches none."""
    arr = one_array(entries)
    ids = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
    p = np.ones(len(ids))
    if len(capped_ids) and len(ids):
        capped = np.asarray(capped_ids, np.int64)
        pos = np.clip(np.searchsorted(capped, ids), 0, len(capped) - 1)
        hit = capped[pos] == ids
        p[hit] = np.asarray(capped_p)[pos[hit]]
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf: a tail entry keeps the row for sure
        log_drop = np.bincount(parents, weights=np.log1p(-p), minlength=len(arr))
    kept = 1.0 - np.exp(log_drop)
    matched = np.bincount(parents, minlength=len(arr)) > 0
    return np.where(matched, kept, unmatched)
