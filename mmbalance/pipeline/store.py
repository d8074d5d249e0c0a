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
    _done/<stage>/<key>.json   written last: a shard counts as done only when its marker exists
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


class RunLockedError(RuntimeError):
    pass


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    # Dictionary encoding slows embedding lists 4x (stack notes); only string columns use it.
    dict_cols = [f.name for f in schema if pa.types.is_string(f.type)]
    return {"use_dictionary": dict_cols, "compression": "zstd"}


class RunStore:
    """Reads and writes the files of one run. Every write is atomic: a temporary name, then a rename."""

    def __init__(self, root: str):
        self.uri = root
        self.fs, self.root = resolve_filesystem(root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

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
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
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
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return json.loads(stream.read())

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
        return pq.read_table(self.path(*parts), filesystem=self.fs, columns=columns, filters=filters)

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

    # Done markers: the last thing a unit of work writes.
    def mark_done(self, stage: str, key: str, summary: dict[str, Any]) -> None:
        self.write_json("_done", stage, f"{key}.json", obj=summary)

    def done_summary(self, stage: str, key: str) -> dict[str, Any] | None:
        try:
            return self.read_json("_done", stage, f"{key}.json")
        except FileNotFoundError:
            return None

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
        """One writer per run directory. A kernel lock (flock) on local disks: released even on kill -9."""
        if not isinstance(self.fs, pafs.LocalFileSystem):
            yield  # object stores have no cheap lock; markers still keep results consistent
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
