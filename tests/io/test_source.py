"""Whether a Parquet file's pages carry CRCs, read from its first page header, for files written by
the writers a corpus comes from (pyarrow with and without, polars), across codecs and encodings."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mmbalance.io.source import has_page_checksums

TABLE = pa.table({"uid": [f"u{i}" for i in range(5000)], "x": np.arange(5000, dtype=np.int64),
                  "emb": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(5000 * 4, np.float32)), 4)})


@pytest.mark.parametrize("compression", ["zstd", "snappy", "none"])
@pytest.mark.parametrize("dictionary", [True, False])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("crc", [True, False])
def test_pyarrow_files_with_and_without_page_crcs(crc, compression, dictionary, version):
    buf = io.BytesIO()
    pq.write_table(TABLE, buf, write_page_checksum=crc, compression=compression, use_dictionary=dictionary,
                   data_page_version=version)
    assert has_page_checksums(pa.BufferReader(buf.getvalue())) is crc
    # the checksums the header announces are real: pyarrow verifies them when asked
    if crc:
        pq.ParquetFile(pa.BufferReader(buf.getvalue()), page_checksum_verification=True).read()


def test_polars_files_and_an_empty_file():
    buf = io.BytesIO()
    pl.from_arrow(TABLE).write_parquet(buf)
    assert has_page_checksums(pa.BufferReader(buf.getvalue())) is False
    empty = io.BytesIO()
    pq.write_table(TABLE.slice(0, 0), empty, write_page_checksum=True)
    assert has_page_checksums(pa.BufferReader(empty.getvalue())) is None


def test_a_local_read_gives_the_same_batches_as_the_whole_chunk_read_and_names_a_corrupt_file(tmp_path):
    """open_source(local=True) (a 1 MiB buffer, no pre-buffering) changes how pages are fetched, not
    what is read; a damaged page is still an input error naming the file."""
    from mmbalance.io.source import open_source, source_batches
    from mmbalance.schemas.contract import InputError

    rng = np.random.default_rng(0)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(20_000 * 64).astype(np.float16)), 64)
    table = pa.table({"uid": [f"u{i}" for i in range(20_000)], "emb": emb})
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=8_192, use_dictionary=["uid"], write_page_checksum=True)

    def read(local: bool, name: str = "shard.parquet") -> pa.Table:
        with pafs.LocalFileSystem().open_input_file(str(path)) as handle:  # as the scan opens a shard
            return pa.concat_tables(source_batches(open_source(handle, name, verify_checksums=True, local=local),
                                                   name, ["uid", "emb"], 4096))

    assert read(local=True).equals(read(local=False))
    assert read(local=True).equals(table)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the embedding pages
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard.parquet"):
        read(local=True)
