"""Content fingerprints of the input shards: what a resume compares to notice a changed corpus.

A shard's fingerprint hashes its size, its modification time and the bytes of its Parquet footer
(schema, row-group offsets, sizes and column statistics). A rewrite at the same byte size changes
the modification time (and almost always the footer), so a rerun notices it without reading the
data. Copying a corpus without keeping modification times (``cp`` without ``-p``) also counts as a
change: the run then asks for ``--overwrite`` rather than trusting results made from other files.

A tar has no footer: its fingerprint hashes its size, modification time, first and last 64 KiB (the
first members' headers and the last sample), and the size, modification time and footer of its side
table (img2dataset's ``<stem>.parquet``, whose rows and statuses are part of the shard): two ranged
reads and a footer per tar, never the whole archive.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from mmbalance.schemas.contract import InputError

_TAIL = 8  # a Parquet file ends with the footer length (4 bytes, little endian) and b"PAR1"


def footer_bytes(handle, relpath: str) -> bytes:
    size = handle.size()
    if size < 12:
        raise InputError(f"{relpath}: not a Parquet file ({size} bytes)")
    handle.seek(size - _TAIL)
    tail = handle.read(_TAIL)
    length = int.from_bytes(tail[:4], "little")
    if tail[4:] != b"PAR1" or length > size - 12:
        raise InputError(f"{relpath}: not a Parquet file (no footer)")
    handle.seek(size - _TAIL - length)
    return handle.read(length)


def _stamp(info: pafs.FileInfo) -> str:
    return f"{info.size}\0{info.mtime_ns if info.mtime_ns is not None else ''}\0"


def shard_fingerprint(fs: pafs.FileSystem, path: str, relpath: str, fmt: str = "auto") -> str:
    from mmbalance.io.source import format_of

    info = fs.get_file_info(path)
    h = hashlib.sha256(_stamp(info).encode())
    try:
        if format_of(relpath, fmt) == "webdataset":
            from mmbalance.io.tar_source import side_table_path, tar_edges

            h.update(tar_edges(fs, path, info.size))
            side = fs.get_file_info(side_table_path(path) or path)
            if side.type == pafs.FileType.File and side.path != path:
                h.update(b"side\0" + _stamp(side).encode())
                with fs.open_input_file(side.path) as handle:
                    h.update(footer_bytes(handle, f"{relpath} (side table)"))
        else:
            with fs.open_input_file(path) as handle:
                h.update(footer_bytes(handle, relpath))
    except OSError as err:
        raise InputError(f"{relpath}: unreadable ({str(err).splitlines()[0]})") from None
    return h.hexdigest()[:24]


def shard_fingerprints(fs: pafs.FileSystem, shards, threads: int = 16) -> dict[str, str]:
    """{relpath: fingerprint} of every shard; footers read in parallel (object stores: one request each)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        prints = list(pool.map(lambda s: shard_fingerprint(fs, s.path, s.relpath, s.format), shards))
    return {s.relpath: p for s, p in zip(shards, prints)}
