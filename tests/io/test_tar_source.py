"""WebDataset tar shards read through the one source reader: members, json fields and img2dataset's
side table as columns, the key as a column, counts before any work, damaged tars as one-line errors."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from corpora import write_tar

from mmbalance.io.source import TAR_KEY, open_shard, read_source
from mmbalance.pipeline.fingerprint import shard_fingerprint
from mmbalance.schemas.contract import InputError

FS = pafs.LocalFileSystem()


def sample(caption: str, **fields) -> dict[str, bytes]:
    return {"jpg": b"\xff\xd8\xff" + caption.encode(), "txt": caption.encode(), "json": json.dumps(fields).encode()}


def read_all(path, columns, batch_rows=1000, relpath="s.tar") -> pa.Table:
    return pa.concat_tables(read_source(FS, str(path), relpath, columns, batch_rows, "webdataset"))


def test_members_json_fields_and_the_key_are_columns(tmp_path):
    path = write_tar(tmp_path / "s.tar", [
        ("dir/000", sample("a cat", status="success", width=3, score=0.5, emb=[1.0, 0.0])),
        ("dir/001", {**sample("a dog", status="success", width=4, score=1, emb=[0.0, 1.0]), "seg.png": b"\x89PNG"}),
        ("dir/002", {"txt": b"no image", "json": b'{"status": "success", "width": 5}'}),
    ])
    with open_shard(FS, str(path), "s.tar", "webdataset") as shard:
        schema, rows = shard.schema, shard.num_rows
    assert rows == 3
    types = {f.name: f.type for f in schema}
    assert types[TAR_KEY] == pa.string() and types["txt"] == pa.string() and types["jpg"] == pa.binary()
    assert types["width"] == pa.int64() and types["score"] == pa.float64() and types["status"] == pa.string()
    assert types["emb"] == pa.list_(pa.float32())
    table = read_all(path, [TAR_KEY, "txt", "jpg", "width", "score", "emb"], batch_rows=2)
    assert table[TAR_KEY].to_pylist() == ["dir/000", "dir/001", "dir/002"]  # a compound extension stays one member
    assert table["txt"].to_pylist() == ["a cat", "a dog", "no image"]
    assert table["jpg"].to_pylist()[2] is None and table["score"].to_pylist() == [0.5, 1.0, None]
    assert table["emb"].to_pylist()[:2] == [[1.0, 0.0], [0.0, 1.0]] and table["width"].to_pylist() == [3, 4, 5]
    parts = list(read_source(FS, str(path), "s.tar", [TAR_KEY], 2, "webdataset"))
    assert [p.num_rows for p in parts] == [2, 1]


def test_side_table_adds_the_failed_downloads_with_their_error_messages(tmp_path):
    # img2dataset's layout: the tar holds the successes (in download order), the side Parquet every row
    write_tar(tmp_path / "00000.tar", [("0002", sample("two", key="0002", status="success")),
                                       ("0000", sample("zero", key="0000", status="success"))])
    pq.write_table(pa.table({
        "key": ["0000", "0001", "0002", "0003"],
        "caption": ["zero", "one", "two", "three"],
        "status": ["success", "failed_to_download", "success", "failed_to_download"],
        "error_message": [None, "HTTP Error 404: Not Found", None, "<urlopen error timed out>"],
    }), tmp_path / "00000.parquet")
    with open_shard(FS, str(tmp_path / "00000.tar"), "00000.tar", "webdataset") as shard:
        assert shard.num_rows == 4  # from the side table's footer, before reading the tar
        assert {"caption", "status", "error_message", "jpg", "txt"} <= set(shard.schema.names)
    table = read_all(tmp_path / "00000.tar", [TAR_KEY, "jpg", "caption", "status", "error_message"])
    assert table[TAR_KEY].to_pylist() == ["0002", "0000", "0001", "0003"]
    assert table["status"].to_pylist() == ["success", "success", "failed_to_download", "failed_to_download"]
    assert table["error_message"].to_pylist()[2:] == ["HTTP Error 404: Not Found", "<urlopen error timed out>"]
    assert table["jpg"].null_count == 2 and table["caption"].to_pylist()[2] == "one"


def test_a_sample_its_side_table_does_not_list_is_an_error_naming_both(tmp_path):
    write_tar(tmp_path / "c.tar", [("k0", sample("zero")), ("zzz", sample("stray"))])
    pq.write_table(pa.table({"key": ["k0"], "status": ["success"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c.tar: sample 'zzz' is not in its side table c.parquet"):
        read_all(tmp_path / "c.tar", [TAR_KEY, "status"], relpath="c.tar")


def test_a_truncated_tar_is_an_input_error_naming_the_file(tmp_path):
    path = write_tar(tmp_path / "t.tar", [(f"{i:03d}", sample("x" * 2000)) for i in range(4)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"t.tar: unreadable data"):
        read_all(path, [TAR_KEY, "jpg"], relpath="t.tar")


def test_fingerprint_sees_a_same_size_rewrite_and_a_changed_side_table(tmp_path):
    path = write_tar(tmp_path / "f.tar", [(f"{i:03d}", sample(f"cap {i}")) for i in range(50)])
    pq.write_table(pa.table({"key": [f"{i:03d}" for i in range(50)], "status": ["success"] * 50}), tmp_path / "f.parquet")
    before = shard_fingerprint(FS, str(path), "f.tar")
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0xFF  # inside the last sample; same size, same modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = shard_fingerprint(FS, str(path), "f.tar")
    assert changed != before
    side = tmp_path / "f.parquet"
    pq.write_table(pa.table({"key": [f"{i:03d}" for i in range(50)], "status": ["success"] * 49 + ["failed"]}), side)
    assert shard_fingerprint(FS, str(path), "f.tar") != changed
