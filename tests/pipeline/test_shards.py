import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import held_out_table, write_shards

from mmbalance.pipeline.shards import discover_shards, inspect_shards, shard_id_for
from mmbalance.schemas.contract import InputError


def test_discovery_is_sorted_and_ids_are_stable(held_out_corpus):
    fs, shards = discover_shards(str(held_out_corpus))
    rel = [s.relpath for s in shards]
    assert rel == sorted(rel) and len(rel) == 4 and rel[0] == "part=0/shard-0.parquet"
    assert [s.index for s in shards] == list(range(4))
    _, again = discover_shards(str(held_out_corpus))
    assert [s.shard_id for s in again] == [s.shard_id for s in shards]
    assert shard_id_for("a/b.parquet", 10) != shard_id_for("a/b.parquet", 11)
    assert shard_id_for("a/b.parquet", 10) != shard_id_for("a_b.parquet", 10)


def test_hidden_and_non_parquet_files_are_ignored(tmp_path):
    d = write_shards(tmp_path / "c", {"a.parquet": held_out_table(10, 1), "_tmp/x.parquet": held_out_table(5, 2)})
    (d / "notes.txt").write_text("hi")
    (d / ".hidden.parquet").write_bytes(b"x")
    _, shards = discover_shards(str(d))
    assert [s.relpath for s in shards] == ["a.parquet"]


def test_empty_and_missing_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        discover_shards(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        discover_shards(str(tmp_path / "nope"))


def test_corrupt_parquet_names_the_file(tmp_path, issue_recipe):
    d = write_shards(tmp_path / "c", {"good.parquet": held_out_table(10, 1)})
    (d / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    fs, shards = discover_shards(str(d))
    with pytest.raises(InputError, match=r"^bad.parquet: unreadable Parquet"):
        inspect_shards(fs, shards, issue_recipe)


def test_truncated_footer_names_the_file(tmp_path, issue_recipe):
    d = write_shards(tmp_path / "c", {"a.parquet": held_out_table(50, 1)})
    data = (d / "a.parquet").read_bytes()
    (d / "a.parquet").write_bytes(data[: len(data) - 20])
    fs, shards = discover_shards(str(d))
    with pytest.raises(InputError, match=r"^a.parquet: unreadable Parquet"):
        inspect_shards(fs, shards, issue_recipe)


def test_missing_column_and_wrong_type(tmp_path, issue_recipe):
    t = held_out_table(10, 1)
    d = write_shards(tmp_path / "c", {"a.parquet": t.drop_columns(["gender"])})
    fs, shards = discover_shards(str(d))
    with pytest.raises(InputError, match=r"a.parquet: missing column 'gender' \(the recipe maps it as attribute gender\)"):
        inspect_shards(fs, shards, issue_recipe)
    bad = t.set_column(t.schema.get_field_index("image_emb"), "image_emb", pa.array(["x"] * 10))
    d2 = write_shards(tmp_path / "d", {"b.parquet": bad})
    fs, shards = discover_shards(str(d2))
    with pytest.raises(InputError, match=r"b.parquet: column 'image_emb' \(image_embedding\) has type string"):
        inspect_shards(fs, shards, issue_recipe)


def test_mixed_fixed_dims_across_shards(tmp_path, issue_recipe):
    d = write_shards(
        tmp_path / "c",
        {"a.parquet": held_out_table(10, 1, dim=8, fixed_size=True), "b.parquet": held_out_table(10, 2, dim=4, fixed_size=True)},
    )
    fs, shards = discover_shards(str(d))
    with pytest.raises(InputError, match=r"b.parquet: column 'image_emb' has dimension 4, but a.parquet has 8"):
        inspect_shards(fs, shards, issue_recipe)


def test_row_counts_come_from_footers(held_out_corpus, issue_recipe):
    fs, shards = discover_shards(str(held_out_corpus))
    inspected = inspect_shards(fs, shards, issue_recipe)
    assert [i.shard.num_rows for i in inspected] == [pq.ParquetFile(s.path).metadata.num_rows for s in shards]
