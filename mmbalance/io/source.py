"""Reading a source shard, whatever its format: a Parquet file (page CRCs verified unless
``execution.verify_checksums`` is off) or a WebDataset tar (``io/tar_source.py``), opened with
``open_shard`` and read in batches of the columns asked for; a damaged file is the one-line input
error naming it. Below the operators and the pipeline, which all read source shards through it
(inspect and fingerprints, scan, embed, DataComp .npz uids, exports, ``mmbalance inspect``,
evaluation shards)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmbalance.schemas.contract import SOURCE_ERROR, TAR_KEY, InputError  # noqa: F401 - re-exported

READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)  # what a corrupt page raises
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
FORMATS = ("parquet", "webdataset")


def unreadable(relpath: str, err: BaseException) -> InputError:
    return InputError(f"{relpath}: unreadable data ({(str(err).splitlines() or [type(err).__name__])[0]})")


def format_of(relpath: str, declared: str = "auto") -> str:
    """The format a shard is read as: the declared one, else from its name (a tar is WebDataset)."""
    if declared in FORMATS:
        return declared
    return "webdataset" if relpath.endswith(TAR_SUFFIXES) else "parquet"


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


class ParquetShard:
    """A Parquet source shard: its footer gives the schema and the row count."""

    format = "parquet"

    def __init__(self, fs: pafs.FileSystem, path: str, relpath: str, verify_checksums: bool = False):
        self.relpath = relpath
        try:
            self._handle = fs.open_input_file(path)
        except OSError as err:
            raise unreadable(relpath, err) from None
        try:
            self.pfile = open_source(self._handle, relpath, verify_checksums)
        except BaseException:
            self._handle.close()
            raise

    @property
    def schema(self) -> pa.Schema:
        return self.pfile.schema_arrow

    @property
    def num_rows(self) -> int:
        return self.pfile.metadata.num_rows

    def batches(self, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
        return source_batches(self.pfile, self.relpath, columns, batch_rows)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(fs: pafs.FileSystem, path: str, relpath: str, fmt: str = "auto", verify_checksums: bool = False):
    """The reader of one source shard (``schema``, ``num_rows``, ``batches(columns, batch_rows)``),
    a context manager; ``fmt`` auto: from the file name."""
    if format_of(relpath, fmt) == "webdataset":
        from mmbalance.io.tar_source import TarShard

        return TarShard(fs, path, relpath)
    return ParquetShard(fs, path, relpath, verify_checksums)


def read_source(fs: pafs.FileSystem, path: str, relpath: str, columns: list[str], batch_rows: int, fmt: str = "auto",
                verify_checksums: bool = False) -> Iterator[pa.Table]:
    """Tables of ``batch_rows`` rows of ``columns`` of one source shard, in row order; unreadable
    data is an input error naming ``relpath``."""
    with open_shard(fs, path, relpath, fmt, verify_checksums) as shard:
        yield from shard.batches(columns, batch_rows)


def shard_info(fs: pafs.FileSystem, path: str, relpath: str, fmt: str = "auto") -> tuple[pa.Schema, int]:
    """(schema, rows) of a shard from its footer (Parquet) or its head and side table (tar), read
    before any work; an unreadable one is an input error naming it and what it was read as."""
    kind = format_of(relpath, fmt)
    try:
        with open_shard(fs, path, relpath, kind) as shard:
            return shard.schema, shard.num_rows
    except InputError as err:
        prefix = f"{relpath}: unreadable data "
        if not str(err).startswith(prefix):
            raise
        what = "Parquet" if kind == "parquet" else "tar"
        raise InputError(f"{relpath}: unreadable {what} {str(err)[len(prefix):]}") from None
