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
    _done/<stage>/<key>.json   written last: the unit's summary and a record (size, checksum) of
                               every file it wrote; a unit counts as done only while its marker
                               reads and every recorded output still matches its record
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmbalance.storage import RunLockedError, display_uri, object_store_lock, resolve_filesystem  # noqa: F401

OUTPUTS_KEY = "_outputs"  # in a done marker: {relative path: file record} of what the unit wrote
_EDGE_BYTES = 1 << 16  # a file record hashes the first and last 64 KiB: a Parquet footer and its page index


def file_record(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """Size and CRC-32 of the head and tail of a file (None when it is missing): cheap to check for
    every unit on a resume, and it catches deleted, truncated and rewritten outputs (a Parquet file's
    tail is its footer, whose offsets and statistics change with any change of content)."""
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            head = handle.read(min(size, _EDGE_BYTES))
            tail_start = max(size - _EDGE_BYTES, len(head))
            handle.seek(tail_start)
            tail = handle.read(size - tail_start)
    except FileNotFoundError:
        return None
    return {"size": size, "crc32": f"{zlib.crc32(tail, zlib.crc32(head)):08x}"}


_OUTPUT_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # only a write raises these


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    # Dictionary encoding slows embedding lists 4x (stack notes); only string columns use it.
    dict_cols = [f.name for f in schema if pa.types.is_string(f.type)]
    # page CRCs cost little and let a reader verify them (execution.verify_checksums)
    return {"use_dictionary": dict_cols, "compression": "zstd", "write_page_checksum": True}


READ_BATCH_ROWS = 4096


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
        """A stream that becomes ``parts`` only when the block exits without an error."""
        final = self.path(*parts)
        parent = final.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open_output_stream(tmp) as stream:
                yield stream
            # rename is atomic on POSIX; object stores make each PUT atomic, markers cover the rest
            self.fs.move(tmp, final)
            relative = "/".join(parts)
            if not relative.startswith("_done/"):
                self.written[relative] = file_record(self.fs, final)
        except BaseException as err:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            if isinstance(err, OSError) and err.errno in _OUTPUT_FULL_ERRNOS and final not in str(err):
                # pyarrow's write errors name no file: say which output could not be written
                raise OSError(err.errno, f"{os.strerror(err.errno)} (writing {final})") from err
            raise

    def _write_bytes(self, parts: tuple[str, ...], data: bytes) -> None:
        with self.atomic_output(*parts) as stream:
            stream.write(data)

    def write_bytes(self, *parts: str, data: bytes) -> None:
        self._write_bytes(parts, data)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def write_json(self, *parts: str, obj: Any) -> None:
        self._write_bytes(parts, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, *parts: str) -> Any:
        """A JSON file of the run; a damaged one is an error naming it (FileNotFoundError passes through)."""
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            data = stream.read()
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise self._damaged(parts, err) from None

    def _damaged(self, parts: tuple[str, ...], err: Exception):
        from mmbalance.schemas.contract import InputError

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return InputError(f"{self.uri_of(*parts)}: damaged run file ({first}); rerun with --overwrite to start over")

    def write_table(self, *parts: str, table: pa.Table, row_group_size: int = 65536) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size, **parquet_options(table.schema))
        self._write_bytes(parts, buf.getvalue())

    @contextlib.contextmanager
    def table_writer(self, *parts: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """Stream batches into one Parquet file that appears atomically when the block exits."""
        with self.atomic_output(*parts) as stream:
            with pq.ParquetWriter(stream, schema, **parquet_options(schema)) as writer:
                yield writer

    def read_table(self, *parts: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """A Parquet file of the run; a damaged one is an error naming it."""
        try:
            if filters is not None:
                return pq.read_table(self.path(*parts), filesystem=self.fs, columns=columns, filters=filters)
            # in batches: decoding a whole file at once peaks far above the table's size (a 20k-row
            # sample with two 512-d float16 columns, 40 MB: +321 MB of RSS whole, +145 MB in batches,
            # and 4x faster)
            with self.fs.open_input_file(self.path(*parts)) as handle:
                pfile = pq.ParquetFile(handle)
                batches = list(pfile.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False))
                schema = batches[0].schema if batches else _selected_schema(pfile.schema_arrow, columns)
                return pa.Table.from_batches(batches, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
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

    def verified_summary(self, stage: str, key: str, expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The summary of a unit that is really done: its marker reads, records its outputs, every
        output still matches its record (size, checksum), and the marker's values for ``expect``'s
        keys (e.g. the solution digest the unit used) equal the current ones. Otherwise None: redo it."""
        marker = self.read_marker(stage, key)
        if marker is None or not isinstance(marker.get(OUTPUTS_KEY), dict):
            return None
        if any(marker.get(k) != v for k, v in (expect or {}).items()):
            return None
        for relative, record in marker.pop(OUTPUTS_KEY).items():
            if file_record(self.fs, self.path(relative)) != record:
                return None
        return marker

    def verified_keys(self, stage: str, keys: list[str], expect: list[dict[str, Any]] | None = None,
                      threads: int = 16) -> set[str]:
        """The keys among ``keys`` whose units are really done (see verified_summary)."""
        from concurrent.futures import ThreadPoolExecutor

        present = {n[: -len(".json")] for n in self.list_files("_done", stage, suffix=".json")}
        expect = expect or [{}] * len(keys)
        candidates = [(k, e) for k, e in zip(keys, expect) if k in present]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            ok = list(pool.map(lambda ke: self.verified_summary(stage, ke[0], ke[1]) is not None, candidates))
        return {k for (k, _), good in zip(candidates, ok) if good}

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
        on S3 a lock object written with a conditional put (``mmbalance.storage``)."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            with object_store_lock(self.uri, self.root):
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
            yield
        finally:
            os.close(fd)

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
