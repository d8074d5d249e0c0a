"""Image bytes for a row of a source shard: inline bytes, an HF ``{bytes, path}`` struct, or a path
(relative to the shard's directory, absolute, or a URI on any filesystem the run reaches). The embed
stage, ``mmbalance validate``'s image check and every export format read images through it. No
decoding here (``operators/embed/images.py`` decodes); every failure is an ``ImageError`` whose
reason names the problem.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.io.storage import resolve_filesystem


class ImageError(Exception):
    """Why one image cannot be used: ``problem`` is a stable short key, ``detail`` free text."""

    def __init__(self, problem: str, detail: str = ""):
        super().__init__(problem, detail)
        self.problem, self.detail = problem, detail

    def reason(self, column: str) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"image {self.problem} (column '{column}'{detail})"


def short_error(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:160]


class ImageSource:
    """Reads image bytes for a row: inline bytes, or a path relative to ``base`` (the shard's
    directory) on ``fs``, an absolute local path, or a URI (through the run's storage settings;
    object-store filesystems are made once per bucket)."""

    def __init__(self, fs: pafs.FileSystem | None = None, base: str | None = None):
        self.fs = fs or pafs.LocalFileSystem()
        self.base = base
        self._uri_fs: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def resolve(self, path: str) -> str:
        """Where a path points: absolute or a URI as is, else relative to ``base``."""
        if "://" in path or os.path.isabs(path) or self.base is None:
            return path
        return f"{self.base.rstrip('/')}/{path}"

    def rows(self, column: pa.Array | pa.ChunkedArray) -> list[tuple[bytes | None, str | None]]:
        """(bytes, path) per row; exactly one is used: bytes when not null, else path."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        t = arr.type
        if pa.types.is_null(t):
            return [(None, None)] * len(arr)
        if pa.types.is_struct(t):
            names = {t.field(i).name for i in range(t.num_fields)}
            valid = arr.is_valid().to_pylist()
            data = arr.field("bytes").to_pylist() if "bytes" in names else [None] * len(arr)
            paths = arr.field("path").to_pylist() if "path" in names else [None] * len(arr)
            return [(d, p) if ok else (None, None) for ok, d, p in zip(valid, data, paths)]
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return [(d, None) for d in arr.to_pylist()]
        if pa.types.is_dictionary(t):
            arr = arr.cast(t.value_type)
        return [(None, p) for p in arr.to_pylist()]

    def read(self, data: bytes | None, path: str | None) -> bytes | None:
        if data is not None:
            return data
        if path is None:
            return None
        if not path:
            raise ImageError("missing", "empty path")
        try:
            if "://" in path:
                fs, inner = self._uri(path)
            else:
                fs, inner = (pafs.LocalFileSystem() if os.path.isabs(path) else self.fs), self.resolve(path)
            with fs.open_input_stream(inner) as stream:
                return stream.read()
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("not found", path[-200:]) from None
        except Exception as err:
            raise ImageError("unreadable", f"{path[-120:]}: {short_error(err)}") from None

    def _uri(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem of a URI, as the run reaches its input: an object store's is made once per
        bucket (its region lookup is a network call), anything else per URI."""
        scheme, rest = uri.split("://", 1)
        if scheme not in ("s3", "gs") or "?" in rest:
            return resolve_filesystem(uri)
        key = (scheme, rest.split("/", 1)[0])
        with self._lock:
            fs = self._uri_fs.get(key)
        if fs is None:
            fs, _ = resolve_filesystem(uri)
            with self._lock:
                self._uri_fs[key] = fs
        return fs, rest.rstrip("/")
