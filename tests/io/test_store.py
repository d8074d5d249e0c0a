"""RunStore's lock: one writer, and an interrupted writer leaves no temporaries. Packed embedding
columns: written as fixed-size binary, read back as the lists they were."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mmbalance.io.store import RunStore


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_the_lock_sweeps_temporaries_another_process_left(tmp_path, interrupt):
    """A Ray worker ended mid-write leaves its temporary (its own cleanup never runs); the writer
    holding the lock sweeps it when interrupted, and the interrupt still propagates."""
    store = RunStore(str(tmp_path / "run"))
    with pytest.raises(interrupt):
        with store.lock():
            store.write_json("tags", "done.json", obj={"ok": True})
            stray = tmp_path / "run" / "tags" / ".tmp-0123abcd-s07.parquet"  # as a killed worker leaves it
            stray.write_bytes(b"partial")
            raise interrupt()
    assert not list((tmp_path / "run").rglob(".tmp-*"))
    assert (tmp_path / "run" / "tags" / "done.json").is_file()  # finished outputs stay


def test_an_ordinary_error_inside_the_lock_leaves_the_directory_as_it_is(tmp_path):
    """Only an interrupt sweeps: a run failing on bad input is resumed by a rerun, which sweeps."""
    store = RunStore(str(tmp_path / "run"))
    with pytest.raises(ValueError):
        with store.lock():
            (tmp_path / "run" / ".tmp-0123abcd-x.parquet").write_bytes(b"partial")
            raise ValueError("bad input")
    assert [p.name for p in (tmp_path / "run").rglob(".tmp-*")] == [".tmp-0123abcd-x.parquet"]


def embeddings_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    half = rng.standard_normal((n, 8)).astype(np.float16)
    half[1, 3] = np.nan  # bit patterns survive, NaN included
    single = rng.standard_normal((n, 3)).astype(np.float32)
    with_null_values = pa.array([None if i % 5 == 0 else float(i) for i in range(n * 2)], pa.float32())
    return pa.table({
        "row": pa.array(np.arange(n)),
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(half.reshape(-1)), 8),
        "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(single.reshape(-1)), 3, mask=pa.array(np.arange(n) % 4 == 2)),
        "holey": pa.FixedSizeListArray.from_arrays(with_null_values, 2),  # nulls inside a list: stored as a list
        "tags": pa.array([["a"]] * n, pa.list_(pa.string())),
    })


def bits(column: pa.FixedSizeListArray) -> list[bytes | None]:
    """Each row's value bytes (None: a null row, whose slots hold no value)."""
    size = column.type.list_size
    flat = column.values.slice(column.offset * size, len(column) * size).to_numpy(zero_copy_only=False)
    rows = flat.view(np.uint8).reshape(len(column), -1)
    return [None if null else rows[i].tobytes() for i, null in enumerate(column.is_null().to_pylist())]


@pytest.mark.parametrize("take", ["whole", "slice", "chunked"])
def test_packed_embedding_columns_read_back_as_they_were_written(tmp_path, take):
    store = RunStore(str(tmp_path / "run"))
    table = embeddings_table(50, 0)
    table = {"whole": table, "slice": table.slice(7, 30), "chunked": pa.concat_tables([table.slice(0, 9), table.slice(20, 13)])}[take]
    store.write_table("sample", "s.parquet", table=table, packed=True)
    stored = pq.read_schema(tmp_path / "run" / "sample" / "s.parquet")
    assert stored.field("image_emb").type == pa.binary(16) and stored.field("text_emb").type == pa.binary(12)
    assert pa.types.is_fixed_size_list(stored.field("holey").type)
    back = store.read_table("sample", "s.parquet")
    for name in ("image_emb", "text_emb", "holey"):
        want = table.column(name).combine_chunks()
        got = back.column(name).combine_chunks()
        assert got.type.value_type == want.type.value_type and got.type.list_size == want.type.list_size
        assert got.is_null().equals(want.is_null())
        assert bits(got) == bits(want)  # to the bit, NaN included
    assert back.column("tags").equals(table.column("tags"))
    chosen = store.read_table("sample", "s.parquet", columns=["row", "image_emb"], filters=pc.field("row") >= 20)
    assert chosen.column("image_emb").to_pylist() == table.filter(pc.field("row") >= 20).column("image_emb").to_pylist()


def test_an_unpacked_file_reads_as_before_and_both_concatenate(tmp_path):
    """A run made before packing (or a narrowed scan's rewrite of it) reads alongside new files."""
    store = RunStore(str(tmp_path / "run"))
    table = embeddings_table(20, 1).select(["row", "image_emb"])
    store.write_table("sample", "old.parquet", table=table)
    store.write_table("sample", "new.parquet", table=table, packed=True)
    old, new = store.read_table("sample", "old.parquet"), store.read_table("sample", "new.parquet")
    assert old.schema.equals(new.schema) and bits(old.column("image_emb").combine_chunks()) == bits(new.column("image_emb").combine_chunks())
    assert pa.concat_tables([old, new]).num_rows == 40
