"""The run directory: atomic writes, done markers and the layout every stage shares.

Layout of OUT (a local path or any pyarrow filesystem URI):
    run.json                   recipe, versions, seeds, input fingerprints
    shards.json                the discovered shards (id, path, size, rows)
    tags/<shard_id>.parquet    per-row tags (attributes, labels, utility) of valid rows
    uids/<shard_id>.parquet    per-row uid hashes, sorted, for the global duplicate check
    rejects/<stage>/<shard_id>.parquet
    dedup/                     duplicate uids across the corpus
    stats/<shard_id>.parquet   signature counts; stats/merged.parquet the corpus total
    solve/solution.json        the balancing solution (small)
    manifest/<shard_id>.parquet
    after/<shard_id>.parquet   weighted signature sums under the manifest weights
    report.json
    _done/<stage>/<key>.json   written last: the unit's summary and a record (size, whole-file
                               xxh3-64 checksum) of every file it wrote; a unit counts as done only
                               while its marker reads and every recorded output still matches its
                               record, and every read of a recorded file checks it first
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import xxhash

from mmbalance.io.storage import RunLockedError, display_uri, object_store_lock, resolve_filesystem  # noqa: F401

OwnerLookup = Callable[[str], "tuple[str, str] | None"]


def _no_owner(relative: str) -> None:
    return None


_owner_lookup: OwnerLookup = _no_owner


def use_owners(lookup: OwnerLookup) -> None:
    """Which done marker records a run file: (stage, unit key) of a path under OUT, or None. The
    stages declare what they write, above this layer; their registry (mmbalance.pipeline.stages)
    hands the lookup down when it loads, so the store imports nothing above it. Every process that
    reads a run (the driver, a worker running a stage, ``mmbalance export``/``report``/``inspect``)
    loads the registry first; until then no file has a record to check."""
    global _owner_lookup
    _owner_lookup = lookup


def owner_of(relative: str) -> tuple[str, str] | None:
    """(stage, unit key) of the done marker that records ``relative`` (see ``use_owners``)."""
    return _owner_lookup(relative)


OUTPUTS_KEY = "_outputs"  # in a done marker: {relative path: file record} of what the unit wrote
CHECKSUM = "xxh3_64"  # whole-file, streamed (benchmarks/bench_checksums.py: as fast as CRC32C or faster, zlib CRC-32 3-6x slower)
_READ_CHUNK = 1 << 20


def _digest(hasher) -> str:
    return f"{hasher.intdigest():016x}"


def bytes_record(data: bytes | memoryview) -> dict[str, Any]:
    """The record of a file holding ``data``: its size and whole-file checksum."""
    return {"size": len(data), CHECKSUM: _digest(xxhash.xxh3_64(data))}


def file_record(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """Size and whole-file checksum of a file, streamed (None when it is missing): a flipped byte
    anywhere in it, a truncation or a rewrite changes the record."""
    hasher, size = xxhash.xxh3_64(), 0
    try:
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(_READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None
    return {"size": size, CHECKSUM: _digest(hasher)}


def record_mismatch(record: dict[str, Any], found: dict[str, Any] | None) -> str | None:
    """Why a file does not match its record (None: it matches)."""
    if found is None:
        return "missing"
    if found["size"] != record.get("size"):
        return f"{found['size']:,} bytes, the done marker recorded {record.get('size', 0):,}"
    if found[CHECKSUM] != record.get(CHECKSUM):
        return "checksum differs from its done marker"
    return None


class _HashingSink:
    """A writable file object that checksums what passes through it (a Parquet writer writes here)."""

    def __init__(self, inner: pa.NativeFile):
        self.inner, self.hasher, self.size, self.closed = inner, xxhash.xxh3_64(), 0, False

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += len(memoryview(data))
        self.inner.write(data)
        return len(memoryview(data))

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def record(self) -> dict[str, Any]:
        return {"size": self.size, CHECKSUM: _digest(self.hasher)}


@dataclass(frozen=True)
class UnitCheck:
    """What a resume found for one unit: done, missing (no readable marker), changed (an identity
    value differs, e.g. the solution digest) or damaged (an output does not match its record)."""

    status: str
    damaged: tuple[tuple[str, str], ...] = ()  # (output relative to OUT, why) of each damaged output


_OUTPUT_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # only a write raises these


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    # Dictionary encoding slows embedding lists 4x (stack notes); only string columns use it, and not
    # the uid, a unique key: a dictionary of every value is a hash table to build and a larger file
    # (a 25k-row manifest: 9.0 -> 6.1 ms to write, 108 -> 64 KB; tags 11.3 -> 8.3 ms, 102 -> 91 KB)
    dict_cols = [f.name for f in schema if pa.types.is_string(f.type) and f.name != "uid"]
    # page CRCs cost little and let a reader verify them (execution.verify_checksums)
    return {"use_dictionary": dict_cols, "compression": "zstd", "write_page_checksum": True}


READ_BATCH_ROWS = 4096
PACKED = b"mmbalance.packed"  # field metadata of a packed float list column: b"float16:512"
_PACKABLE = {pa.float16(): "float16", pa.float32(): "float32"}
_UNPACKED = {name: kind for kind, name in _PACKABLE.items()}


def pack_float_lists(table: pa.Table) -> pa.Table:
    """Fixed-size float16/float32 list columns as fixed-size binary, one value per row. Parquet
    stores a float list value by value, with a level pair each (float16 as a 2-byte fixed-length
    value): a 20k-row sample of two 512-d float16 columns took 0.9 s to write and 0.3 s to read,
    as binary ~5x and ~2x less. Lists with null values inside are left as they are."""
    fields, columns = [], []
    for field, column in zip(table.schema, table.columns):
        packed = _packed(field, column)
        fields.append(packed[0] if packed else field)
        columns.append(packed[1] if packed else column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _packed(field: pa.Field, column: pa.ChunkedArray) -> tuple[pa.Field, pa.Array] | None:
    """One column packed, or None when it is not a fixed-size float list without null values inside."""
    if not pa.types.is_fixed_size_list(field.type) or field.type.value_type not in _PACKABLE:
        return None
    arr, dim, width = column.combine_chunks(), field.type.list_size, field.type.value_type.byte_width
    flat = arr.values.slice(arr.offset * dim, len(arr) * dim)
    if flat.null_count:
        return None
    values = flat.buffers()[1].slice(flat.offset * width, len(flat) * width)
    validity = pa.array(arr.is_valid().to_numpy(zero_copy_only=False)).buffers()[1] if arr.null_count else None
    meta = {**(field.metadata or {}), PACKED: f"{_PACKABLE[field.type.value_type]}:{dim}".encode()}
    return (pa.field(field.name, pa.binary(dim * width), field.nullable, meta),
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(dim * width), len(arr), [validity, values], arr.null_count))


def unpack_float_lists(table: pa.Table) -> pa.Table:
    """``pack_float_lists`` undone: each packed column back to fixed_size_list<element: float>
    (the child name Parquet reads a list back with), zero-copy."""
    if not any(f.metadata and PACKED in f.metadata for f in table.schema):
        return table
    fields, columns = [], []
    for field, column in zip(table.schema, table.columns):
        meta = dict(field.metadata or {})
        if PACKED not in meta:
            fields.append(field)
            columns.append(column)
            continue
        kind, size = meta.pop(PACKED).decode().split(":")
        value_type, dim = _UNPACKED[kind], int(size)
        list_type = pa.list_(pa.field("element", value_type), dim)
        chunks = []
        for chunk in column.chunks:
            values = pa.Array.from_buffers(value_type, len(chunk) * dim, [None, chunk.buffers()[1]], 0, chunk.offset * dim)
            mask = chunk.is_null() if chunk.null_count else None
            chunks.append(pa.FixedSizeListArray.from_arrays(values, type=list_type, mask=mask))
        fields.append(pa.field(field.name, list_type, field.nullable, meta or None))
        columns.append(pa.chunked_array(chunks, list_type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _selected_schema(schema: pa.Schema, columns: list[str] | None) -> pa.Schema:
    return schema if columns is None else pa.schema([schema.field(c) for c in columns])


class RunStore:
    """Reads and writes the files of one run. Every write is atomic: a temporary name, then a rename."""

    def __init__(self, root: str):
        self.uri = root
        self.fs, self.root = resolve_filesystem(root)
        self.written: dict[str, dict[str, Any]] = {}  # files written through this store, since take_written()

    def take_written(self) -> dict[str, dict[str, Any]]:
        """The records of the files written since the last call (a done marker lists them)."""
        written, self.written = self.written, {}
        return dict(sorted(written.items()))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """``path(*parts)`` as the user would type it: with its scheme on an object store."""
        return display_uri(self.uri, self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    @contextlib.contextmanager
    def atomic_output(self, *parts: str) -> Iterator[pa.NativeFile]:
        """A stream that becomes ``parts`` only when the block exits without an error (not recorded
        for a done marker: run outputs are written by write_bytes, write_json, write_table, table_writer)."""
        with self._atomic(parts, hashed=False) as stream:
            yield stream

    @contextlib.contextmanager
    def _atomic(self, parts: tuple[str, ...], hashed: bool = True):
        final = self.path(*parts)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as stream:
                sink = _HashingSink(stream) if hashed else stream
                yield sink
            # rename is atomic on POSIX; object stores make each PUT atomic, markers cover the rest
            self.fs.move(tmp, final)
            relative = "/".join(parts)
            if hashed and not relative.startswith("_done/"):
                self.written[relative] = sink.record()  # checksummed as written: no second read
            self.finished(relative)
        except BaseException as err:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            if isinstance(err, OSError) and err.errno in _OUTPUT_FULL_ERRNOS and final not in str(err):
                # pyarrow's write errors name no file: say which output could not be written
                raise OSError(err.errno, f"{os.strerror(err.errno)} (writing {final})") from err
            raise

    def finished(self, relative: str) -> None:
        """Called once each output is complete under its final name (every write goes through
        here); a store that ships finished files elsewhere (an export's uploader) overrides it."""

    def _write_bytes(self, parts: tuple[str, ...], data: bytes) -> None:
        with self._atomic(parts) as stream:
            stream.write(data)

    def write_bytes(self, *parts: str, data: bytes) -> None:
        self._write_bytes(parts, data)

    def read_bytes(self, *parts: str) -> bytes:
        """A file of the run, checked against the record of the done marker that lists it (if any):
        a damaged file is an error naming it, never data read as if it were sound."""
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            data = stream.read()
        record = self.recorded("/".join(parts))
        if record is not None:
            self._check(parts, record, bytes_record(data))
        return data

    def recorded(self, relative: str) -> dict[str, Any] | None:
        """The record of ``relative`` in the done marker of the unit that wrote it (see ``use_owners``)."""
        unit = owner_of(relative)
        if unit is None:
            return None
        marker = self.read_marker(*unit)
        record = (marker or {}).get(OUTPUTS_KEY, {}).get(relative) if isinstance(marker, dict) else None
        return record if isinstance(record, dict) and CHECKSUM in record else None

    def verify(self, *parts: str) -> None:
        """Check one recorded file in full (streamed) before reading it some other way."""
        record = self.recorded("/".join(parts))
        if record is not None:
            self._check(parts, record, file_record(self.fs, self.path(*parts)))

    def _check(self, parts: tuple[str, ...], record: dict[str, Any], found: dict[str, Any] | None) -> None:
        why = record_mismatch(record, found)
        if why is not None:
            from mmbalance.schemas.contract import InputError

            raise InputError(f"{self.path(*parts)}: damaged run file ({why}); rerun `mmbalance rebalance` with the "
                             "same arguments to redo it and what depends on it")

    def write_json(self, *parts: str, obj: Any) -> None:
        self._write_bytes(parts, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, *parts: str) -> Any:
        """A JSON file of the run; a damaged one is an error naming it (FileNotFoundError passes through)."""
        data = self.read_bytes(*parts)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise self._damaged(parts, err) from None

    def _damaged(self, parts: tuple[str, ...], err: Exception):
        from mmbalance.schemas.contract import InputError

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return InputError(f"{self.uri_of(*parts)}: damaged run file ({first}); rerun with --overwrite to start over")

    def write_table(self, *parts: str, table: pa.Table, row_group_size: int = 65536, packed: bool = False) -> None:
        """``packed``: embedding columns stored as fixed-size binary (``pack_float_lists``), for the
        run's own files only; ``read_table`` unpacks them."""
        if packed:
            table = pack_float_lists(table)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size, **parquet_options(table.schema))
        self._write_bytes(parts, buf.getvalue())

    @contextlib.contextmanager
    def table_writer(self, *parts: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream batches into one Parquet file that appears atomically when the block exits."""
        with self._atomic(parts) as stream:
            with pq.ParquetWriter(stream, schema, **parquet_options(schema)) as writer:
                yield writer

    def read_table(self, *parts: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """A Parquet file of the run, checked in full against its record first; a damaged one is an
        error naming it."""
        data = pa.py_buffer(self.read_bytes(*parts))
        try:
            if filters is not None:
                return unpack_float_lists(pq.read_table(pa.BufferReader(data), columns=columns, filters=filters))
            # in batches: decoding a whole file at once peaks far above the table's size (a 20k-row
            # sample with two 512-d float16 columns, 40 MB: +321 MB of RSS whole, +145 MB in batches,
            # and 4x faster)
            pfile = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            batches = list(pfile.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False))
            schema = batches[0].schema if batches else _selected_schema(pfile.schema_arrow, columns)
            return unpack_float_lists(pa.Table.from_batches(batches, schema=schema))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise self._damaged(parts, err) from None

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Relative names of the files directly inside a directory (hidden temporaries excluded)."""
        base = self.path(*parts)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return []
        selector = pafs.FileSelector(base, recursive=False)
        names = [
            f.base_name
            for f in self.fs.get_file_info(selector)
            if f.type == pafs.FileType.File and not f.base_name.startswith(".") and f.base_name.endswith(suffix)
        ]
        return sorted(names)

    # Done markers: the last thing a unit of work writes, with a record of every file it wrote.
    def mark_done(self, stage: str, key: str, summary: dict[str, Any], outputs: dict[str, Any] | None = None) -> None:
        """``outputs``: {relative path: file record}; by default what this store wrote since take_written()."""
        records = self.take_written() if outputs is None else outputs
        self.write_json("_done", stage, f"{key}.json", obj={**summary, OUTPUTS_KEY: records})

    def done_summary(self, stage: str, key: str) -> dict[str, Any] | None:
        """A unit's summary, or None when its marker is missing or unreadable (a torn write, an edit)."""
        marker = self.read_marker(stage, key)
        if marker is None:
            return None
        marker.pop(OUTPUTS_KEY, None)
        return marker

    def read_marker(self, stage: str, key: str) -> dict[str, Any] | None:
        try:
            marker = self.read_json("_done", stage, f"{key}.json")
        except (FileNotFoundError, ValueError, UnicodeDecodeError):  # ValueError: JSONDecodeError
            return None
        return marker if isinstance(marker, dict) else None

    def check_unit(self, stage: str, key: str, expect: dict[str, Any] | None = None) -> UnitCheck:
        """Is the unit really done? Its marker reads and records its outputs, the marker's values for
        ``expect``'s keys (e.g. the solution digest the unit used) equal the current ones, and every
        recorded output still matches its record: size and whole-file checksum, read in full."""
        marker = self.read_marker(stage, key)
        if marker is None or not isinstance(marker.get(OUTPUTS_KEY), dict):
            return UnitCheck("missing")
        if any(marker.get(k) != v for k, v in (expect or {}).items()):
            return UnitCheck("changed")
        damaged = []
        for relative, record in sorted(marker[OUTPUTS_KEY].items()):
            if not isinstance(record, dict) or CHECKSUM not in record:
                return UnitCheck("missing")  # a record from an older format: redo, nothing to trust
            why = record_mismatch(record, file_record(self.fs, self.path(relative)))
            if why is not None:
                damaged.append((relative, why))
        return UnitCheck("damaged", tuple(damaged)) if damaged else UnitCheck("done")

    def verified_summary(self, stage: str, key: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The summary of a unit that is really done (see check_unit); otherwise None: redo it."""
        if self.check_unit(stage, key, expect).status != "done":
            return None
        return self.done_summary(stage, key)

    def check_units(self, stage: str, keys: list[str], expect: list[dict[str, Any]] | None = None,
                    threads: int = 16) -> dict[str, UnitCheck]:
        """check_unit for many units, in parallel (outputs are read in full)."""
        from concurrent.futures import ThreadPoolExecutor

        present = self.done_keys(stage)
        expect = expect or [{}] * len(keys)
        checks = {k: UnitCheck("missing") for k in keys}
        candidates = [(k, e) for k, e in zip(keys, expect) if k in present]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = list(pool.map(lambda ke: self.check_unit(stage, ke[0], ke[1]), candidates))
        checks.update({k: c for (k, _), c in zip(candidates, found)})
        return checks

    def verified_keys(self, stage: str, keys: list[str], expect: list[dict[str, Any]] | None = None,
                      threads: int = 16) -> set[str]:
        """The keys among ``keys`` whose units are really done (see check_unit)."""
        return {k for k, c in self.check_units(stage, keys, expect, threads).items() if c.status == "done"}

    def forget(self, stage: str, key: str) -> None:
        """Delete a unit's done marker: the next run redoes it."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path("_done", stage, f"{key}.json"))

    def done_keys(self, stage: str) -> set[str]:
        return {n[: -len(".json")] for n in self.list_files("_done", stage, suffix=".json")}

    def sweep_temporaries(self) -> int:
        """Delete temporaries a killed writer left behind; only call while holding the run lock."""
        if not self.exists():
            return 0
        removed = 0
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True)):
            if info.type == pafs.FileType.File and info.base_name.startswith(".tmp-"):
                self.fs.delete_file(info.path)
                removed += 1
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer per run directory. A kernel lock (flock) on local disks: released even on kill -9;
        on S3 a lock object written with a conditional put (``mmbalance.io.storage``). A writer
        interrupted inside (SIGTERM, Ctrl-C) leaves no temporaries: a worker process ended mid-write
        (Ray ends them without their cleanup) leaves its own, swept here before the lock is let go."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with object_store_lock(self.uri, self.root), self._swept_on_interrupt():
                yield
            return
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(f"{self.uri}: another mmbalance run is writing to this directory") from None
            with self._swept_on_interrupt():
                yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _swept_on_interrupt(self) -> Iterator[None]:
        try:
            yield
        except (SystemExit, KeyboardInterrupt):
            with contextlib.suppress(OSError):  # the interrupt is what the caller must see
                self.sweep_temporaries()
            raise

    def locked_by_another(self) -> bool:
        """Is a run writing here now (its lock held)? Creates nothing; False where there is no lock file."""
        lock_path = os.path.join(self.root, ".lock")
        if not isinstance(self.fs, pafs.LocalFileSystem) or not os.path.exists(lock_path):
            return False
        import fcntl

        fd = os.open(lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases the probe's shared lock
        return False

    def clear(self) -> None:
        """Delete the run's files, keeping the lock held by this process."""
        if not self.exists():
            return
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            if info.base_name == ".lock":
                continue
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)
