"""A resume that can't be fooled: changed inputs, deleted or damaged outputs, markers and solutions.

Each fault either gives the manifest an uninterrupted run on the same input gives (byte for byte) or
a one-line error naming the file (exit 2 from the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table
from rich.console import Console

from mmbalance.inspect import inspect_path
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.io.recipes import load_recipe

SHARDS = 3


def opts(**kw) -> RunOptions:
    return RunOptions(executor="local", show_progress=False, html_report=False, **kw)


def write_plain(path: Path, table: pa.Table) -> None:
    """No compression, dictionaries or statistics: permuting a string column keeps the file size and
    the footer bytes, so only the modification time tells a rewrite apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False, store_schema=False)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    for i in range(SHARDS):
        write_plain(tmp_path / "corpus" / f"shard-{i}.parquet", held_out_table(600 + 100 * i, seed=40 + i))
    return tmp_path / "corpus"


@pytest.fixture
def recipe(tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_FROM_ISSUE.replace("cap: 1000", "cap: 60"))
    return load_recipe(path)


def manifest(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "manifest").iterdir())}


def rewrite_same_size(shard: Path) -> None:
    """Rewrite a shard with its occupation column permuted: the same bytes in another order."""
    table = pq.read_table(shard)
    before = (shard.stat().st_size, pq.ParquetFile(shard).metadata.to_dict())
    occupation = table.column("occupation").to_numpy(zero_copy_only=False)
    permuted = np.random.default_rng(0).permutation(len(occupation))
    table = table.set_column(table.schema.get_field_index("occupation"), "occupation", pa.array(occupation[permuted]))
    write_plain(shard, table)
    assert (shard.stat().st_size, pq.ParquetFile(shard).metadata.to_dict()) == before  # the hard case


class Crash(Exception):
    pass


def crash_after(stage: str, units: int):
    seen: list[str] = []

    def hook(name, summary):
        seen.append(name)
        if name == stage and seen.count(stage) == units:
            raise Crash()

    return hook


def test_same_size_rewrite_after_a_finished_run_is_refused_naming_the_shard(corpus, recipe, tmp_path):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    rewrite_same_size(corpus / "shard-1.parquet")
    with pytest.raises(InputError, match=r"^shard-1\.parquet: input shard changed since the run"):
        rebalance(str(corpus), str(out), recipe, opts())
    # --overwrite starts over: the manifest of a fresh run on the new input
    rebalance(str(corpus), str(out), recipe, opts(overwrite=True))
    rebalance(str(corpus), str(tmp_path / "fresh"), recipe, opts())
    assert manifest(out) == manifest(tmp_path / "fresh")


def test_same_size_rewrite_between_a_crash_and_the_resume_is_refused(corpus, recipe, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Crash):
        rebalance(str(corpus), str(out), recipe, opts(on_progress=crash_after("scan", 2)))
    rewrite_same_size(corpus / "shard-0.parquet")
    with pytest.raises(InputError, match=r"^shard-0\.parquet: input shard changed"):
        rebalance(str(corpus), str(out), recipe, opts())


@pytest.mark.parametrize("overwrite", [False, True])
def test_deleted_manifest_file_is_restored_by_a_rerun(corpus, recipe, tmp_path, overwrite):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    clean = manifest(out)
    victim = sorted((out / "manifest").iterdir())[1]
    victim.unlink()
    redone: list[str] = []
    result = rebalance(str(corpus), str(out), recipe, opts(overwrite=overwrite, on_progress=lambda n, s: redone.append(n)))
    assert redone == ["weigh"]  # only the unit whose output went missing
    assert manifest(out) == clean
    assert result.report["rows"]["manifest"] == sum(pq.read_metadata(p).num_rows for p in (out / "manifest").iterdir())


@pytest.mark.parametrize("directory", ["manifest", "tags", "uids"])
def test_truncated_output_is_redone_by_a_rerun(corpus, recipe, tmp_path, directory):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    clean = manifest(out)
    victim = sorted((out / directory).glob("shard-*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    redone: list[str] = []
    rebalance(str(corpus), str(out), recipe, opts(on_progress=lambda n, s: redone.append(n)))
    # a damaged unit is redone with every unit that read its outputs: a scan's tags and uids are
    # read by the dedup bucket, its own signatures and weigh units, the dedup by every signatures
    # unit, those by the solve, and the solution by every weigh unit
    after_scan = ["scan", "dedup"] + ["signatures"] * SHARDS + ["weigh"] * SHARDS
    assert redone == {"manifest": ["weigh"], "tags": after_scan, "uids": after_scan}[directory]
    assert victim.read_bytes() == data
    assert manifest(out) == clean


def test_output_damaged_at_the_same_size_is_redone(corpus, recipe, tmp_path):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    clean = manifest(out)
    victim = sorted((out / "manifest").iterdir())[2]
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # inside the footer
    victim.write_bytes(bytes(data))
    rebalance(str(corpus), str(out), recipe, opts())
    assert manifest(out) == clean


@pytest.mark.parametrize("stage", ["scan", "weigh"])
def test_truncated_done_marker_redoes_its_unit(corpus, recipe, tmp_path, stage):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    clean = manifest(out)
    marker = sorted((out / "_done" / stage).iterdir())[0]
    marker.write_bytes(marker.read_bytes()[:17])
    redone: list[str] = []
    rebalance(str(corpus), str(out), recipe, opts(on_progress=lambda n, s: redone.append(n)))
    assert redone == [stage]
    assert json.loads(marker.read_text())["shard_id"] == marker.stem
    assert manifest(out) == clean


def test_damaged_solution_is_solved_again(corpus, recipe, tmp_path):
    out = tmp_path / "o"
    rebalance(str(corpus), str(out), recipe, opts())
    clean, solution = manifest(out), (out / "solve" / "solution.json").read_bytes()
    (out / "solve" / "solution.json").write_bytes(solution[: len(solution) // 3])
    rebalance(str(corpus), str(out), recipe, opts())
    assert (out / "solve" / "solution.json").read_bytes() == solution
    assert manifest(out) == clean


def test_changed_solution_after_a_crash_is_never_applied_to_the_unfinished_shards_only(corpus, recipe, tmp_path):
    rebalance(str(corpus), str(tmp_path / "clean"), recipe, opts())
    out = tmp_path / "o"
    with pytest.raises(Crash):
        rebalance(str(corpus), str(out), recipe, opts(on_progress=crash_after("weigh", 1)))
    path = out / "solve" / "solution.json"
    edited = json.loads(path.read_text())
    edited["diagnostics"]["edited"] = True  # valid JSON, another digest
    path.write_text(json.dumps(edited))
    redone: list[str] = []
    rebalance(str(corpus), str(out), recipe, opts(on_progress=lambda n, s: redone.append(n)))
    # solved again from the signatures: the same solution, so every weigh unit agrees with it
    assert path.read_bytes() == (tmp_path / "clean" / "solve" / "solution.json").read_bytes()
    assert manifest(out) == manifest(tmp_path / "clean")
    digests = {json.loads(m.read_text())["solution_digest"] for m in (out / "_done" / "weigh").iterdir()}
    assert len(digests) == 1


def test_cli_one_line_exit_2_for_a_changed_shard_and_a_damaged_run_file(corpus, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE_FROM_ISSUE)
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out), "--recipe", str(recipe),
           "--executor", "local", "--quiet"]
    assert subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240).returncode == 0
    (out / "run.json").write_text('{"format": 2, "recipe')  # torn: the run record itself
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"{out}/run.json: damaged run file" in proc.stderr
    rewrite_same_size(corpus / "shard-2.parquet")
    proc = subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    rewrite_same_size(corpus / "shard-2.parquet")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"mmbalance: error: shard-2.parquet: input shard changed since the run in {out} started "
                                   "(size, modification time or footer differ); pass --update to redo only what the "
                                   "changed shards affect, --overwrite to redo the run, or choose another --out")


def failed_reason(out: Path) -> str:
    return json.loads(next((out / "_failed" / "scan").iterdir()).read_text())["reason"]


def corrupt_first_page(path: Path) -> None:
    """Flip bytes inside the uid column's first data page; the footer stays valid, so the shard
    passes inspection and fails only when the scan decompresses it."""
    start = pq.read_metadata(path).row_group(0).column(0).data_page_offset + 40
    data = bytearray(path.read_bytes())
    for i in range(start, start + 32):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_on_unit_error_defer_records_the_failed_shard_and_a_rerun_retries_only_it(tmp_path, recipe, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    corpus = tmp_path / "corpus"
    tables = {f"shard-{i}.parquet": held_out_table(500 + 50 * i, seed=70 + i) for i in range(4)}
    for name, table in tables.items():
        corpus.mkdir(exist_ok=True)
        pq.write_table(table, corpus / name, compression="zstd")
    pq.write_table(tables["shard-2.parquet"], tmp_path / "good-shard-2.parquet", compression="zstd")
    corrupt_first_page(corpus / "shard-2.parquet")
    deferring = recipe.model_copy(update={"execution": recipe.execution.model_copy(update={"on_unit_error": "defer"})})
    out = tmp_path / "o"
    ran: list[str] = []
    run_opts = RunOptions(executor=executor, show_progress=False, html_report=False, on_progress=lambda n, s: ran.append(n))
    with pytest.raises(InputError, match=r"^shard-2\.parquet: unreadable data .*: 1 of 4 scan units failed, the others finished"):
        rebalance(str(corpus), str(out), deferring, run_opts)
    assert ran == ["scan"] * 3
    failed = list((out / "_failed" / "scan").iterdir())
    assert len(failed) == 1 and json.loads(failed[0].read_text())["reason"].startswith("shard-2.parquet: unreadable data")
    assert len(list((out / "_done" / "scan").iterdir())) == 3
    console = Console(record=True, width=200)
    summary = inspect_path(str(out), console=console)  # inspect reads the same records
    assert summary["done"] == {"scan": 3} and summary["failed"]["scan"][0]["reason"] == failed_reason(out)
    text = console.export_text().replace("\u00a0", " ")
    assert "finished units: scan 3/4" in text and "failed scan units: 1" in text

    ran.clear()  # still unreadable: only the failed unit is retried
    with pytest.raises(InputError, match="1 of 4 scan units failed"):
        rebalance(str(corpus), str(out), deferring, run_opts)
    assert ran == []

    # repaired (a rewrite of a shard no finished unit depends on is accepted): only it is scanned
    (tmp_path / "good-shard-2.parquet").replace(corpus / "shard-2.parquet")
    ran.clear()
    result = rebalance(str(corpus), str(out), deferring, run_opts)
    assert ran.count("scan") == 1 and not (out / "_failed" / "scan").exists()
    rebalance(str(corpus), str(tmp_path / "clean"), recipe, opts())
    assert manifest(out) == manifest(tmp_path / "clean")
    rows = result.report["rows"]
    assert rows["input"] == sum(t.num_rows for t in tables.values()) == rows["manifest"] + rows["rejected"]


def test_on_unit_error_stop_is_the_default_and_stops_at_the_first_failure(tmp_path, recipe):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        pq.write_table(held_out_table(400, seed=80 + i), corpus / f"shard-{i}.parquet", compression="zstd")
    corrupt_first_page(corpus / "shard-0.parquet")
    with pytest.raises(InputError, match=r"^shard-0\.parquet: unreadable data"):
        rebalance(str(corpus), str(tmp_path / "o"), recipe, opts())
    assert not (tmp_path / "o" / "_failed").exists()
