"""dedup, per uid-hash bucket: the duplicate uids across the corpus in one hash range, confirmed on
the strings. The buckets are sized so one bucket's hashes fit comfortably in a worker."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmbalance.io.store import RunStore
from mmbalance.operators import dedup
from mmbalance.pipeline.stage import Output, RunContext, UnitStage
from mmbalance.pipeline.stages.scan import TAGS, UIDS
from mmbalance.schemas.contract import UID_HASH_SCHEMA

DEDUP = Output("dedup/bucket-{bucket}.parquet")


def bucket_key(bucket: int, buckets: int) -> str:
    return f"{bucket:05d}-of-{buckets:05d}"


@dataclass(frozen=True)
class DedupTask:
    bucket: int
    buckets: int
    lo: str  # the uid-hash range, inclusive (decimal: uint64 does not survive every serialiser)
    hi: str
    shard_ids: list[str]
    rows: int

    @property
    def key(self) -> str:
        return bucket_key(self.bucket, self.buckets)


class Dedup(UnitStage):
    name = "dedup"
    unit = "bucket"
    summary = "duplicate uids across the corpus in one uid-hash range, confirmed on the strings"
    reads = (UIDS.every, TAGS.every)
    writes = (DEDUP,)
    task_type = DedupTask
    key_field = "bucket"

    def buckets(self, state) -> int:
        return max(1, math.ceil(state.valid_rows() / state.recipe.execution.dedup_bucket_rows))

    def keys(self, state) -> list[str]:
        buckets = self.buckets(state)
        return [bucket_key(b, buckets) for b in range(buckets)]

    def unit_rows(self, state) -> list[int]:
        buckets = self.buckets(state)
        return [state.valid_rows() // buckets] * buckets

    def tasks(self, state) -> list[DedupTask]:
        buckets, ids = self.buckets(state), [s.shard_id for s in state.shards]
        return [DedupTask(b, buckets, str(lo), str(hi), ids, rows)
                for b, ((lo, hi), rows) in enumerate(zip(dedup.bucket_bounds(buckets), self.unit_rows(state)))]

    def run(self, ctx: RunContext, task: DedupTask, store: RunStore) -> dict[str, Any]:
        lo, hi = int(task.lo), int(task.hi)
        parts_hash, parts_row, parts_shard = [], [], []
        for index, sid in enumerate(task.shard_ids):
            for table in _hash_range(store, sid, lo, hi):
                parts_hash.append(table.column("uid_hash").to_numpy())
                parts_row.append(table.column("row").to_numpy())
                parts_shard.append(np.full(table.num_rows, index, np.int64))
        rows_seen = int(sum(len(h) for h in parts_hash))

        def fetch_uids(shard_pos: int, rows: np.ndarray) -> list[str]:
            tags = store.read_table("tags", f"{task.shard_ids[shard_pos]}.parquet", columns=["row", "uid"])
            picked = tags.filter(pc.is_in(tags.column("row"), value_set=pa.array(rows, pa.int64())))
            by_row = dict(zip(picked.column("row").to_pylist(), picked.column("uid").to_pylist()))
            return [by_row[int(r)] for r in rows]

        if parts_hash:
            dups = dedup.find_duplicates(
                np.concatenate(parts_shard), np.concatenate(parts_row), np.concatenate(parts_hash), fetch_uids
            )
        else:
            dups = dedup.DUPLICATES_SCHEMA.empty_table()
        store.write_table("dedup", f"bucket-{task.key}.parquet", table=dups)
        # duplicates are found here and rejected by the signatures stage: nothing leaves the run here
        return {"rows_in": rows_seen, "rows_out": rows_seen, "rejected": 0, "reasons": {}, "duplicates": dups.num_rows}


def _hash_range(store: RunStore, shard_id: str, lo: int, hi: int):
    """The (uid_hash, row) rows of a shard's sorted uid file with lo <= uid_hash <= hi: row-group
    statistics skip the row groups outside the range, so a bucket reads a slice of each file."""
    with store.fs.open_input_file(store.path("uids", f"{shard_id}.parquet")) as handle:
        pfile = pq.ParquetFile(handle)
        column = pfile.schema_arrow.get_field_index("uid_hash")
        for i in range(pfile.metadata.num_row_groups):
            st = pfile.metadata.row_group(i).column(column).statistics
            if st is not None and st.has_min_max and (st.max < lo or st.min > hi):
                continue
            table = pfile.read_row_group(i).cast(UID_HASH_SCHEMA)
            hashes = table.column("uid_hash")
            keep = pc.and_(pc.greater_equal(hashes, pa.scalar(lo, pa.uint64())), pc.less_equal(hashes, pa.scalar(hi, pa.uint64())))
            table = table.filter(keep)
            if table.num_rows:
                yield table


NO_DUPLICATES: dict[str, list] = {"rows": [], "first_shard": [], "first_row": []}


def duplicates(state) -> dict[int, dict[str, list]]:
    """Duplicate rows per shard index ({"rows", "first_shard" (relpath), "first_row"}), read once per
    run from the dedup buckets. Memory grows with the number of duplicates, not rows."""

    def read() -> dict[int, dict[str, list]]:
        by_shard: dict[int, dict[str, list]] = defaultdict(lambda: {"rows": [], "first_shard": [], "first_row": []})
        for key in Dedup().keys(state):
            table = state.store.read_table("dedup", f"bucket-{key}.parquet")
            for s, r, fs, fr in zip(*(table.column(c).to_pylist() for c in ("shard_index", "row", "first_shard_index", "first_row"))):
                entry = by_shard[s]
                entry["rows"].append(r)
                entry["first_shard"].append(state.shards[fs].relpath)
                entry["first_row"].append(fr)
        return dict(by_shard)

    return state.memo("duplicates", read)


def of_shard(state, shard) -> dict[str, list]:
    """One shard's duplicates."""
    return duplicates(state).get(shard.index, NO_DUPLICATES)
