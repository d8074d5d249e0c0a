"""MosaicML MDS shards (format version 2, uncompressed), written without ``mosaicml-streaming``.

That package pins numpy < 2.2, so it cannot live beside mmbalance; the layout is small and
documented, and tests/operators/export/test_streaming_consumer.py reads what this writes with the
real ``StreamingDataset`` in its own environment (scripts/setup_consumers.sh).

A shard ``shard.NNNNN.mds`` is: uint32 sample count n, n + 1 uint32 absolute offsets, the JSON
config, then the samples. A sample is the uint32 sizes of its variable-size columns followed by
every column's bytes, columns in sorted name order. ``index.json`` lists the shards. A shard is
closed before it would pass ``size_limit`` bytes; its samples are spooled to a temporary file,
so memory stays bounded however many writers are open.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from typing import Any

import numpy as np

from mmbalance.operators.export.base import OpenOutput

# encodings this writer supports: name -> fixed size in bytes (None: variable)
ENCODINGS: dict[str, int | None] = {"str": None, "bytes": None, "int": 8, "int64": 8, "float64": 8, "json": None}


def _encode(encoding: str, value: Any) -> bytes:
    if encoding == "str":
        return value.encode("utf-8")
    if encoding == "bytes":
        return bytes(value)
    if encoding in ("int", "int64"):
        return np.int64(value).tobytes()
    if encoding == "float64":
        return np.float64(value).tobytes()
    if encoding == "json":
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise ValueError(f"unsupported MDS encoding {encoding!r}")


class MDSShardWriter:
    """Writes one MDS dataset directory (``<parts>/shard.*.mds`` + ``index.json``) into a store."""

    def __init__(self, store, parts: tuple[str, ...], columns: dict[str, str], size_limit: int):
        for name, enc in columns.items():
            if enc not in ENCODINGS:
                raise ValueError(f"column {name!r}: unsupported MDS encoding {enc!r}")
        self.store, self.parts, self.size_limit = store, parts, size_limit
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [ENCODINGS[e] for e in self.encodings]
        self.config = {"version": 2, "format": "mds", "compression": None, "hashes": [], "size_limit": size_limit,
                       "column_names": self.names, "column_encodings": self.encodings, "column_sizes": self.sizes}
        self.config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self._reset()

    def _reset(self) -> None:
        self.spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        self.lengths: list[int] = []
        self.shard_bytes = 4 + 4 + len(self.config_bytes)  # what the library counts before samples

    def write(self, sample: dict[str, Any]) -> None:
        heads, body = [], []
        for name, enc, size in zip(self.names, self.encodings, self.sizes):
            datum = _encode(enc, sample[name])
            if size is None:
                heads.append(len(datum))
            body.append(datum)
        data = np.array(heads, np.uint32).tobytes() + b"".join(body)
        if self.lengths and self.shard_bytes + len(data) + 4 > self.size_limit:
            self._flush()
        self.spool.write(data)
        self.lengths.append(len(data))
        self.shard_bytes += len(data) + 4
        self.samples += 1

    def _flush(self) -> None:
        n = len(self.lengths)
        start = 4 + 4 * (n + 1) + len(self.config_bytes)
        offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]) + start
        if offsets[-1] >= 1 << 32:
            raise ValueError("MDS shard over 4 GiB: lower streaming.size_limit")
        name = f"shard.{len(self.shards):05d}.mds"
        out = OpenOutput(self.store, *self.parts, name)
        try:
            out.stream.write(struct.pack("<I", n) + offsets.astype("<u4").tobytes() + self.config_bytes)
            self.spool.seek(0)
            shutil.copyfileobj(self.spool, out.stream, 1 << 20)
        except BaseException:
            out.abort()
            raise
        out.commit()
        self.spool.close()
        self.shards.append({**self.config, "samples": n, "zip_data": None,
                            "raw_data": {"basename": name, "bytes": int(offsets[-1]), "hashes": {}}})
        self._reset()

    def finish(self) -> None:
        if self.lengths:
            self._flush()
        self.store.write_json(*self.parts, "index.json", obj={"version": 2, "shards": self.shards})

    def abort(self) -> None:
        self.spool.close()
