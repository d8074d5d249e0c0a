"""Content fingerprints of the input shards: what a resume compares to notice a changed corpus.

A shard's fingerprint hashes its size, its modification time and the bytes of its Parquet footer
(schema, row-group offsets, sizes and column statistics). A rewrite at the same byte size changes
the modification time (and almost always the footer), so a rerun notices it without reading the
data. Copying a corpus without keeping modification times (``cp`` without ``-p``) also counts as a
change: the run then asks for ``--overwrite`` rather than trusting results made from other files.
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


def shard_fingerprint(fs: pafs.FileSystem, path: str, relpath: str) -> str:
    info = fs.get_file_info(path)
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    try:
        with fs.open_input_file(path) as handle:
            footer = footer_bytes(handle, relpath)
    except OSError as err:
        raise InputError(f"{relpath}: unreadable ({str(err).splitlines()[0]})") from None
    h = hashlib.sha256(f"{info.size}\0{mtime}\0".encode())
    h.update(footer)
    return h.hexdigest()[:24]


def shard_fingerprints(fs: pafs.FileSystem, shards, threads: int = 16) -> dict[str, str]:
    """{relpath: fingerprint} of every shard; footers read in parallel (object stores: one request each)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        prints = list(pool.map(lambda s: shard_fingerprint(fs, s.path, s.relpath), shards))
    return {s.relpath: p for s, p in zip(shards, prints)}
