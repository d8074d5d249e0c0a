"""A DataComp subset file: the sorted ``np.dtype("u8,u8")`` array of kept uids (``datacomp/uids.npy``).

DataComp's resharder keys a sample by ``divmod(int(uid, 16), 2**64)`` and writes it once for every
time that key is listed, so each uid is listed ``repeats`` times: the resharded corpus is the
manifest. A uid that is not 1 to 32 hex digits cannot be keyed that way: the export stops with an
error naming it before anything is written (``export_run`` checks every kept uid first), unless
``datacomp.non_hex_uids: sha256`` asks for the first 128 bits of SHA-256 of its UTF-8 bytes
instead; ``datacomp/uid_map.parquet`` then lists (uid, u0, u1) for the mapped ones so they can be
joined back. The array is built in memory (16 bytes per listed uid), like DataComp's own tools.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.operators.export.base import ExportContext, Exporter, Rows, register_format
from mmbalance.schemas.contract import InputError

UID_DTYPE = np.dtype("u8,u8")
_HEX = re.compile(r"^[0-9a-fA-F]{1,32}$")


def uid_pair(uid: str) -> tuple[int, int, bool]:
    """(upper 64 bits, lower 64 bits, hashed?) of a uid: its hex value, else the start of its SHA-256."""
    if _HEX.match(uid):
        hi, lo = divmod(int(uid, 16), 1 << 64)
        return hi, lo, False
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
        self.distinct = 0
        self.hashing = ctx.options.datacomp.non_hex_uids == "sha256"
        self.listed_once = ctx.options.copies == "once"

    def write(self, rows: Rows) -> None:
        pairs = np.empty(len(rows), dtype=UID_DTYPE)
        for i, uid in enumerate(rows.uid):
            hi, lo, hashed = uid_pair(uid)
            if hashed:
                if not self.hashing:  # export_run checks up front; this guards direct use
                    raise InputError(f"{rows.shard} row {int(rows.row[i])}: uid {uid!r} is not hex (DataComp keys int(uid, 16))")
                self.mapped["uid"].append(uid)
                self.mapped["u0"].append(hi)
                self.mapped["u1"].append(lo)
            pairs[i] = (hi, lo)
        self.distinct += len(rows)
        self.parts.append(pairs if self.listed_once else np.repeat(pairs, rows.repeats))

    def close(self) -> dict[str, Any]:
        arr = np.concatenate(self.parts) if self.parts else np.empty(0, dtype=UID_DTYPE)
        arr.sort()
        if len(np.unique(arr)) != self.distinct:
            raise ValueError("datacomp export: two kept uids map to the same 128-bit value")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self.store.write_bytes("uids.npy", data=buf.getvalue())
        summary: dict[str, Any] = {"file": self.ctx.dest_path(self.dir, "uids.npy"), "uids": int(arr.size),
                                   "distinct_uids": self.distinct, "hashed_uids": len(self.mapped["uid"]),
                                   "listed": "once per kept uid" if self.listed_once else "repeats times per kept uid"}
        if self.mapped["uid"]:
            table = pa.table({"uid": pa.array(self.mapped["uid"], pa.string()),
                              "u0": pa.array(self.mapped["u0"], pa.uint64()),
                              "u1": pa.array(self.mapped["u1"], pa.uint64())}).sort_by([("u0", "ascending"), ("u1", "ascending")])
            self.store.write_table("uid_map.parquet", table=table)
            summary["uid_map"] = self.ctx.dest_path(self.dir, "uid_map.parquet")
            summary["mapping"] = "uids that are not hex: first 128 bits of sha256(uid), big-endian"
        return summary
