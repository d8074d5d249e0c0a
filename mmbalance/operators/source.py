"""Reading a source shard: its Parquet file opened (page CRCs verified on request,
``execution.verify_checksums``, on by default) and read in batches, a corrupt footer or page being the one-line
input error naming the file. Below the operators and the pipeline, which all read source shards
through it (scan, embed, DataComp .npz uids, exports, inspect, evaluation shards)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.schemas.contract import InputError

READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)  # what a corrupt page raises


def unreadable(relpath: str, err: BaseException) -> InputError:
    return InputError(f"{relpath}: unreadable data ({str(err).splitlines()[0]})")


def open_source(handle, relpath: str, verify_checksums: bool = False) -> pq.ParquetFile:
    """A source shard's ParquetFile, verifying page CRCs on request (``execution.verify_checksums``);
    an unreadable footer is an input error naming the file."""
    try:
        return pq.ParquetFile(handle, page_checksum_verification=verify_checksums)
    except READ_ERRORS as err:
        raise unreadable(relpath, err) from None


def source_batches(pfile: pq.ParquetFile, relpath: str, columns: list[str], batch_rows: int):
    """Tables of ``batch_rows`` rows of an open source shard; a corrupt page (or, verifying, a page
    whose CRC does not match) is an input error naming the file. Only the reads are guarded: an
    error raised by the consumer of a batch is its own."""
    try:
        batches = pfile.iter_batches(batch_size=batch_rows, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield pa.Table.from_batches([batch])
    except READ_ERRORS as err:
        raise unreadable(relpath, err) from None


def read_batches(handle, relpath: str, columns: list[str], batch_rows: int, verify_checksums: bool = False):
    """Record batches of a source shard; a corrupt page (or, verifying, a page whose CRC does not
    match) is an input error naming the file."""
    yield from source_batches(open_source(handle, relpath, verify_checksums), relpath, columns, batch_rows)


def has_page_checksums(handle, metadata: pq.FileMetaData | None = None) -> bool | None:
    """Whether a Parquet file's pages carry CRCs (None: it has no page). pyarrow does not expose page
    headers, so the first column chunk's first page header (Thrift compact protocol) is read: the
    ``crc`` field (4) follows ``type``, ``uncompressed_page_size`` and ``compressed_page_size``
    (1-3, i32) when the writer set it; one writer sets it for every page or none."""
    meta = metadata or pq.ParquetFile(handle).metadata
    if meta.num_rows == 0 or meta.row_group(0).num_columns == 0:
        return None
    chunk = meta.row_group(0).column(0)
    offset = chunk.dictionary_page_offset if chunk.has_dictionary_page and chunk.dictionary_page_offset else chunk.data_page_offset
    handle.seek(offset)
    header = handle.read(32)
    field, i = 0, 0
    while i < len(header):
        kind, delta = header[i] & 0x0F, header[i] >> 4
        i += 1
        field += delta
        if kind != 5 or delta == 0 or field > 4:  # not the next i32 field: no crc
            return False
        if field == 4:
            return True
        while i < len(header) and header[i] & 0x80:  # skip the varint value
            i += 1
        i += 1
    return False
