"""WebDataset tar shards as source shards (img2dataset's ``--output_format webdataset``, DataComp's
and LAION's shards), streamed member by member; read through ``io/source.py``.

A sample is a run of consecutive members sharing a key (webdataset's rule: the key is the member
name up to the first dot of its file name, the extension the rest). Its columns:

  ``__key__``      the sample key (the run's uid unless the recipe maps another column)
  ``<ext>``        a member's bytes (binary); ``txt``/``text``/``caption`` members as UTF-8 strings
  ``<field>``      each top-level field of its ``.json`` member: strings, booleans, integers,
                   floats, lists of numbers (list<float32>, e.g. embeddings); anything else as JSON text
  side table       img2dataset's ``<stem>.parquet`` beside the tar, which lists every row it tried
                   (with ``status`` and ``error_message``): its columns for each sample, by key, and
                   its rows that have no sample (failed downloads) after the tar's samples, in its order

A member's extension wins over a side-table column of the same name, which wins over a json field.
A shard's columns are those of its side table and of its first ``SCHEMA_SAMPLES`` samples. A value
of another type than the field has there (or a ``.json`` member that is not a JSON object) makes
the row's ``__error__`` column say so: the scan rejects that row with the reason, the others go on.
The rows of a shard are counted from its side table's footer, else by a pass over the member headers
(seeks on a local disk; on an object store a streamed read of the tar).
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmbalance.io.source import TAR_SUFFIXES, unreadable
from mmbalance.schemas.contract import SOURCE_ERROR, TAR_KEY, InputError

SCHEMA_SAMPLES = 64
TEXT_EXTENSIONS = ("txt", "text", "caption")
JSON_EXTENSIONS = ("json", "jsn")
SIDE_KEY = "key"  # img2dataset's side table names each row's sample key here
STREAM_BUFFER = 8 << 20  # object stores: one ranged read per 8 MiB, never one per tar member
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
_KIND_TYPES = {"string": pa.string(), "bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(),
               "floats": pa.list_(pa.float32())}
_KIND_WORDS = {"bool": "a boolean", "int64": "an integer", "float64": "a number", "floats": "a list of numbers"}


def side_table_path(path: str) -> str | None:
    """Where img2dataset writes the side Parquet of a tar: the same stem."""
    for suffix in TAR_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)] + ".parquet"
    return None


def _kind_of(values: list[Any]) -> str:
    """The column kind of a json field from its values in the first samples (None: absent or null)."""
    seen = [v for v in values if v is not None]
    if not seen:
        return "string"
    if all(isinstance(v, bool) for v in seen):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        return "int64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
        return "float64"
    if all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for v in seen):
        return "floats"
    return "string"


def _fits(value: Any, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int64":
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if kind == "float64":
        return number
    return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def json_column(values: list[Any], kind: str, name: str, keys: list[str]) -> tuple[pa.Array, dict[int, str]]:
    """A json field's values as an Arrow array of its kind; values of another type become null and
    a per-row problem ({row: reason})."""
    if kind == "string":  # lenient: anything not a string is kept as its JSON text
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()), {}
    try:
        if all(v is None or _fits(v, kind) for v in values):
            return pa.array(values, _KIND_TYPES[kind]), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    problems: dict[int, str] = {}
    kept = []
    for i, v in enumerate(values):
        if v is None or _fits(v, kind):
            kept.append(v)
        else:
            kept.append(None)
            problems[i] = f"{keys[i]}.json: field '{name}' is {json.dumps(v)[:60]}, not {_KIND_WORDS[kind]}"
    return pa.array(kept, _KIND_TYPES[kind]), problems


class _Tail:
    """A read-only stream that counts what was read and keeps the last two reads, so the end of a
    streamed archive can be checked (tarfile ends quietly at a damaged or missing header)."""

    def __init__(self, raw):
        self.raw, self.pos, self.prev, self.last = raw, 0, b"", b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.prev, self.last = self.last, data
        return data

    def block_at(self, offset: int) -> bytes | None:
        kept = self.prev + self.last
        start = self.pos - len(kept)
        return kept[offset - start: offset - start + tarfile.BLOCKSIZE] if offset >= start else None


@dataclass
class _Batch:
    """Samples gathered for one table."""

    keys: list[str] = field(default_factory=list)
    members: list[dict[str, bytes | None] | None] = field(default_factory=list)
    side_rows: list[int | None] = field(default_factory=list)

    def add(self, key: str, members: dict[str, bytes | None] | None, side_row: int | None) -> None:
        self.keys.append(key)
        self.members.append(members)
        self.side_rows.append(side_row)

    def __len__(self) -> int:
        return len(self.keys)


class TarShard:
    """One WebDataset tar (and its side table, when there is one) as a source shard."""

    format = "webdataset"

    def __init__(self, fs: pafs.FileSystem, path: str, relpath: str):
        self.fs, self.path, self.relpath = fs, path, relpath
        side = side_table_path(path)
        self.side_path = side if side and fs.get_file_info(side).type == pafs.FileType.File else None
        self.side_name = self.side_path.rsplit("/", 1)[-1] if self.side_path else None
        self._schema: pa.Schema | None = None
        self._origin: dict[str, str] = {}  # column -> key | member | side | json | error
        self._kinds: dict[str, str] = {}  # json field -> kind
        self._exts: dict[str, str] = {}  # member column -> extension

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads."""

    # -- members and samples ----------------------------------------------------------------------

    def _members(self, wanted: set[str]) -> Iterator[tuple[str, str, bytes | None]]:
        """(key, extension, bytes or None) of the archive's regular files in order; bytes only for
        ``wanted`` extensions (a local tar is read with seeks past the others)."""
        gz = self.path.endswith((".gz", ".tgz"))
        raw = tail = None
        try:
            if isinstance(self.fs, pafs.LocalFileSystem) and not gz:
                raw = open(self.path, "rb")
                tar = tarfile.open(fileobj=raw, mode="r:")
            else:
                raw = self.fs.open_input_stream(self.path, compression=None, buffer_size=STREAM_BUFFER)
                tail = _Tail(gzip.GzipFile(fileobj=raw) if gz else raw)
                tar = tarfile.open(fileobj=tail, mode="r|")
            for member in tar:
                tar.members = []  # tarfile keeps every header it read: memory would grow with the tar
                if not member.isreg():
                    continue
                match = _NAME.match(member.name)
                if match is None:
                    continue
                key, ext = match.groups()
                data = tar.extractfile(member).read() if ext in wanted else None
                yield key, ext, data
            end = tail.block_at(tar.offset) if tail is not None else self._block(raw, tar.offset)
            if end is None or len(end) < tarfile.BLOCKSIZE or any(end):
                raise tarfile.ReadError(f"damaged or missing header at byte {tar.offset}")
        except _ERRORS as err:
            raise unreadable(self.relpath, err) from None
        finally:
            if raw is not None:
                raw.close()

    @staticmethod
    def _block(handle, offset: int) -> bytes:
        handle.seek(offset)
        return handle.read(tarfile.BLOCKSIZE)

    def _samples(self, wanted: set[str]) -> Iterator[tuple[str, dict[str, bytes | None]]]:
        key, members = None, {}
        for k, ext, data in self._members(wanted):
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            members[ext] = data
        if key is not None:
            yield key, members

    # -- schema and rows --------------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._infer()
        return self._schema

    def _side_schema(self) -> pa.Schema | None:
        if self.side_path is None:
            return None
        try:
            with self.fs.open_input_file(self.side_path) as handle:
                schema = pq.ParquetFile(handle).schema_arrow
        except (OSError, pa.ArrowInvalid) as err:
            raise InputError(f"{self.relpath}: unreadable side table {self.side_name} ({str(err).splitlines()[0]})") from None
        if SIDE_KEY not in schema.names:
            raise InputError(f"{self.relpath}: its side table {self.side_name} has no '{SIDE_KEY}' column to match samples by")
        return schema

    def _infer(self) -> None:
        fields: dict[str, pa.DataType] = {TAR_KEY: pa.string()}
        self._origin = {TAR_KEY: "key"}
        exts: list[str] = []
        values: dict[str, list[Any]] = {}
        for n, (key, members) in enumerate(self._samples(set(JSON_EXTENSIONS))):
            if n >= SCHEMA_SAMPLES:
                break
            for ext, data in members.items():
                if ext not in exts:
                    exts.append(ext)
                if ext in JSON_EXTENSIONS and data is not None:
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(obj, dict):
                        for name, value in obj.items():
                            values.setdefault(name, []).append(value)
        for ext in exts:
            if ext not in JSON_EXTENSIONS:
                fields[ext] = pa.string() if ext in TEXT_EXTENSIONS else pa.binary()
                self._origin[ext], self._exts[ext] = "member", ext
        side = self._side_schema()
        for f in side or []:
            if f.name not in fields:
                fields[f.name] = f.type
                self._origin[f.name] = "side"
        for name, vals in values.items():
            if name not in fields:
                self._kinds[name] = _kind_of(vals)
                fields[name] = _KIND_TYPES[self._kinds[name]]
                self._origin[name] = "json"
        fields[SOURCE_ERROR] = pa.string()
        self._origin[SOURCE_ERROR] = "error"
        self._schema = pa.schema(list(fields.items()))

    @property
    def num_rows(self) -> int:
        """From the side table's footer (every row it lists, one sample per key), else counted."""
        if self.side_path is not None:
            with self.fs.open_input_file(self.side_path) as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        return sum(1 for _ in self._samples(set()))

    # -- batches ----------------------------------------------------------------------------------

    def _side(self, columns: list[str]) -> tuple[pa.Table, dict[str, int]] | None:
        if self.side_path is None:
            return None
        with self.fs.open_input_file(self.side_path) as handle:
            table = pq.ParquetFile(handle).read(columns=list(dict.fromkeys([SIDE_KEY, *columns])))
        keys = table.column(SIDE_KEY).cast(pa.string()).to_pylist()
        return table, {k: i for i, k in enumerate(keys)}

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
        schema = self.schema
        missing = [c for c in columns if c not in self._origin]
        if missing:
            raise InputError(f"{self.relpath}: no column '{missing[0]}'; columns present: {', '.join(schema.names[:20])}")
        columns = list(dict.fromkeys(columns))
        wanted = {self._exts[c] for c in columns if self._origin[c] == "member"}
        if any(self._origin[c] == "json" for c in columns):
            wanted |= set(JSON_EXTENSIONS)
        side = self._side([c for c in columns if self._origin[c] == "side"])
        seen = np.zeros(side[0].num_rows if side else 0, bool)
        batch = _Batch()
        for key, members in self._samples(wanted):
            row = None
            if side is not None:
                row = side[1].get(key)
                if row is None:
                    raise InputError(f"{self.relpath}: sample '{key}' is not in its side table {self.side_name}")
                seen[row] = True
            batch.add(key, members, row)
            if len(batch) >= batch_rows:
                yield self._table(batch, columns, side)
                batch = _Batch()
        if side is not None:  # rows the side table lists without a sample: failed downloads
            keys = side[0].column(SIDE_KEY).cast(pa.string())
            for row in np.flatnonzero(~seen):
                batch.add(keys[int(row)].as_py(), None, int(row))
                if len(batch) >= batch_rows:
                    yield self._table(batch, columns, side)
                    batch = _Batch()
        if len(batch):
            yield self._table(batch, columns, side)

    def _table(self, batch: _Batch, columns: list[str], side) -> pa.Table:
        problems: dict[int, str] = {}
        objects = self._json_objects(batch, problems) if any(self._origin[c] == "json" for c in columns) else None
        arrays = []
        for name in columns:
            origin = self._origin[name]
            if origin == "key":
                arrays.append(pa.array(batch.keys, pa.string()))
            elif origin == "member":
                ext = self._exts[name]
                data = pa.array([m.get(ext) if m is not None else None for m in batch.members], pa.binary())
                arrays.append(data.view(pa.string()) if ext in TEXT_EXTENSIONS else data)  # UTF-8 checked by validation
            elif origin == "side":
                rows = pa.array(batch.side_rows, pa.int64())
                arrays.append(side[0].column(name).take(rows).combine_chunks() if side else pa.nulls(len(batch)))
            elif origin == "json":
                values = [o.get(name) if o is not None else None for o in objects]
                array, bad = json_column(values, self._kinds[name], name, batch.keys)
                arrays.append(array)
                for i, why in bad.items():
                    problems.setdefault(i, why)
            else:
                arrays.append(None)  # the error column, filled once every column is read
        if SOURCE_ERROR in columns:
            errors = [problems.get(i) for i in range(len(batch))]
            arrays[columns.index(SOURCE_ERROR)] = pa.array(
                [f"sample data unreadable ({e})" if e else None for e in errors], pa.string())
        return pa.Table.from_arrays(arrays, schema=pa.schema([self.schema.field(c) for c in columns]))

    @staticmethod
    def _json_objects(batch: _Batch, problems: dict[int, str]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for i, (key, members) in enumerate(zip(batch.keys, batch.members)):
            data = None
            if members is not None:
                data = next((members[e] for e in JSON_EXTENSIONS if members.get(e) is not None), None)
            if data is None:
                out.append(None)
                continue
            try:
                obj = json.loads(data)
            except ValueError as err:
                problems[i] = f"{key}.json: not valid JSON ({str(err)[:80]})"
                out.append(None)
                continue
            if not isinstance(obj, dict):
                problems[i] = f"{key}.json: not a JSON object"
                obj = None
            out.append(obj)
        return out


def tar_edges(fs: pafs.FileSystem, path: str, size: int, edge: int = 1 << 16) -> bytes:
    """The first and last ``edge`` bytes of a tar: its first members' headers and the last sample
    (what a fingerprint hashes; a rewrite at the same size almost always changes them)."""
    with fs.open_input_file(path) as handle:
        head = handle.read(min(size, edge))
        start = max(size - edge, len(head))
        handle.seek(start)
        return head + handle.read(size - start)
