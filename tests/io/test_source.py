"""Whether a Parquet file's pages carry CRCs, read from its first page header, for files written by
the writers a corpus comes from (pyarrow with and without, polars), across codecs and encodings."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
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
