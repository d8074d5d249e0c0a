"""A DataComp subset file: the sorted ``np.dtype("u8,u8")`` array of kept uids (``datacomp/uids.npy``).

DataComp uids are 128-bit hashes written as 32 hex digits: ``(int(uid[:16], 16), int(uid[16:], 16))``.
Any other uid is mapped to the first 128 bits of SHA-256 of its UTF-8 bytes (stable across runs
and machines); when that happens ``datacomp/uid_map.parquet`` lists (uid, u0, u1) for the mapped
ones so they can be joined back. Every uid with repeats > 0 appears once. The array is built in
memory (16 bytes per kept uid), like DataComp's own tools.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.operators.export import ExportContext, Exporter, Rows, register_format

UID_DTYPE = np.dtype("u8,u8")
_HEX128 = re.compile(r"^[0-9a-fA-F]{32}$")


def uid_pair(uid: str) -> tuple[int, int, bool]:
    """(upper 64 bits, lower 64 bits, hashed?) of a uid."""
    if _HEX128.match(uid):
        return int(uid[:16], 16), int(uid[16:], 16), False
    h = hashlib.sha256(uid.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:16], "big"), True


def uid_array(uids: list[str]) -> np.ndarray:
    """Sorted structured array of the uids' 128-bit values."""
    arr = np.array([uid_pair(u)[:2] for u in uids], dtype=UID_DTYPE)
    arr.sort()
    return arr


@register_format("datacomp")
class DatacompExporter(Exporter):
    dir = "datacomp"
    needs_source = False

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        self.parts: list[np.ndarray] = []
        self.mapped: dict[str, list] = {"uid": [], "u0": [], "u1": []}

    def write(self, rows: Rows) -> None:
        pairs = np.empty(len(rows), dtype=UID_DTYPE)
        for i, uid in enumerate(rows.uid):
            hi, lo, hashed = uid_pair(uid)
            pairs[i] = (hi, lo)
            if hashed:
                self.mapped["uid"].append(uid)
                self.mapped["u0"].append(hi)
                self.mapped["u1"].append(lo)
        self.parts.append(pairs)

    def close(self) -> dict[str, Any]:
        arr = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=UID_DTYPE)
        arr.sort()
        if arr.size > 1 and np.any(arr[1:] == arr[:-1]):
            raise ValueError("datacomp export: two kept uids map to the same 128-bit value")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self.store._write_bytes(("uids.npy",), buf.getvalue())
        summary: dict[str, Any] = {"file": self.ctx.dest_path(self.dir, "uids.npy"), "uids": int(arr.size),
                                   "hashed_uids": len(self.mapped["uid"])}
        if self.mapped["uid"]:
            table = pa.table({"uid": pa.array(self.mapped["uid"], pa.string()),
                              "u0": pa.array(self.mapped["u0"], pa.uint64()),
                              "u1": pa.array(self.mapped["u1"], pa.uint64())}).sort_by([("u0", "ascending"), ("u1", "ascending")])
            self.store.write_table("uid_map.parquet", table=table)
            summary["uid_map"] = self.ctx.dest_path(self.dir, "uid_map.parquet")
            summary["mapping"] = "uids that are not 32 hex digits: first 128 bits of sha256(uid), big-endian"
        return summary
