"""RunStore's lock: one writer, and an interrupted writer leaves no temporaries."""

from __future__ import annotations

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
