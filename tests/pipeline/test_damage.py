"""A byte flipped anywhere in a run's outputs is found, redone with everything that read it, and the
rerun ends byte-identical to the undamaged run; ``--plan`` lists the damaged units first.

One baseline run (local) on a corpus of 4 x 40,000 rows with long random uids and a camera label
of 16,000 long random values, so that the outputs are several MB where that is cheap (measured,
per shard: manifest 3.15 MB, tags 6.7 MB, signatures 3.65 MB; the fit sample 4.0 MB, the solution
2.5 MB): a flip in them escapes a check of their first and last 64 KiB (the old done markers').
Two kinds stay small: assign (151 KB a shard: a row number and three small cluster ids per row;
several MB would take ~25x the rows) and the centroid file (262 KB: 1,024 x 64 float32; several
MB would take ~12x the clustering and assign work); in them the flips at 50% (and the models' at
30%) land where the old check never read. SIZE_FLOOR holds these sizes' floors.

Each test damages a copy of the run. Plans are cheap (they read, run nothing): every kind x
offset is planned. Reruns cost a run each, so they share flips. Locally: the per-shard kinds get
one rerun each with shard i flipped at offset i, the single-file kinds (sample, solution, models)
four reruns with the offsets rotated between them. On Ray: four reruns that each flip several
per-shard kinds (ray_flips: every per-shard kind at every offset), and one single-file rotation
(sample at 30%, solution at 50%, models at 90%).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, run_outputs
from rich.console import Console
from typer.testing import CliRunner

from mmbalance.cli import app
from mmbalance.io.source import has_page_checksums
from mmbalance.pipeline import plan, stages
from mmbalance.pipeline.rebalance import Rebalancer, RunOptions, rebalance
from mmbalance.io.recipes import load_recipe

SHARDS, ROWS = 4, 40_000
UID_BYTES, CAMERA_VALUES, CAMERA_BYTES = 72, 16_000, 96
OFFSETS = (0.1, 0.3, 0.5, 0.9)
RECIPE = RECIPE_FROM_ISSUE.replace("  - {name: occupation, source: column, column: occupation}\n", """\
  - {name: occupation, source: column, column: occupation}
  - {name: camera, source: column, column: camera}
clusters:
  - {name: concept, embedding: image, k: 1024, levels: [128, 16], niter: 4, nredo: 1}
sample: {size: 10000}
report: {html: false, leakage: false}
""").replace("by: occupation", "by: camera").replace("cap: 1000", "cap: 8").replace(
    "  formats: [parquet]\n",  # uids longer than DataComp's 128-bit hex keys: list their SHA-256 keys
    "  formats: [parquet]\n  datacomp: {non_hex_uids: sha256}\n")
PER_SHARD = {"manifest": "manifest", "tags": "tags", "assign": "assign", "signatures": "signatures"}
SINGLE = {"sample": "fit/sample.parquet", "solution": "solve/solution.json", "models": "models/concept.npy"}
# what each kind's file (per-shard kinds: shard 1's) is at least, in bytes: the docstring's sizes
MB = 1_000_000
SIZE_FLOOR = {"manifest": 3 * MB, "tags": 6.5 * MB, "signatures": 3.5 * MB, "sample": 3.5 * MB, "solution": 2.5 * MB,
              "assign": 150_000, "models": 260_000}
OWNER = {"manifest": "weigh", "tags": "scan", "assign": "assign", "signatures": "signatures",
         "sample": "fit", "solution": "solve", "models": "fit"}
# What a rerun redoes for one damaged unit of each kind, read off the stage table by hand (not
# computed by the code under test): 1 = that unit, "all" = every unit of the stage.
AFTER_FIT = {"fit": 1, "assign": "all", "signatures": "all", "solve": 1, "weigh": "all"}
CASCADE = {
    "manifest": {"weigh": 1},
    "tags": {"scan": 1, "dedup": "all", **AFTER_FIT},  # dedup reads tags/*, the fit sample/*
    "assign": {"assign": 1, "signatures": 1, "solve": 1, "weigh": "all"},
    "signatures": {"signatures": 1, "solve": 1, "weigh": "all"},
    "sample": AFTER_FIT,
    "models": AFTER_FIT,
    "solution": {"solve": 1, "weigh": "all"},
}
LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def random_bytes(rng: np.random.Generator, count: int, nbytes: int) -> list[bytes]:
    return [bytes(r) for r in rng.integers(0, 256, size=(count, nbytes), dtype=np.uint8)]


# long random camera values, base64: incompressible, and many (large signatures and solution)
CAMERAS = ["cam-" + base64.urlsafe_b64encode(b).decode()
           for b in random_bytes(np.random.default_rng(899), CAMERA_VALUES, CAMERA_BYTES)]


def corpus_table(i: int) -> pa.Table:
    """The held-out layout with long random uids (hex, as DataComp's export wants; incompressible:
    large manifests, tags and fit sample) and the camera label."""
    table = held_out_table(ROWS, seed=500 + i, dim=64, fixed_size=True)
    rng = np.random.default_rng(900 + i)
    table = table.set_column(0, "uid", pa.array([b.hex() for b in random_bytes(rng, ROWS, UID_BYTES)]))
    return table.append_column("camera", pa.array([CAMERAS[c] for c in rng.integers(0, CAMERA_VALUES, ROWS)]))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    base = tmp_path_factory.mktemp("damage")
    (base / "corpus").mkdir()
    for i in range(SHARDS):
        pq.write_table(corpus_table(i), base / "corpus" / f"shard-{i}.parquet", write_page_checksum=True)
    (base / "r.yaml").write_text(RECIPE)
    recipe = load_recipe(base / "r.yaml")
    rebalance(str(base / "corpus"), str(base / "clean"), recipe, LOCAL)
    yield {"base": base, "corpus": base / "corpus", "recipe": recipe, "clean": base / "clean"}
    shutil.rmtree(base)  # ~200 MB: pytest would keep it for three sessions


@pytest.fixture
def out(baseline, tmp_path) -> Path:
    """A copy of the baseline run for a test to damage, removed after it (~120 MB each)."""
    copy = tmp_path / "out"
    shutil.copytree(baseline["clean"], copy)
    yield copy
    shutil.rmtree(copy)


def per_shard_file(run: Path, kind: str, shard: int) -> str:
    names = sorted(p.name for p in (run / PER_SHARD[kind]).glob("shard-*.parquet"))
    return f"{PER_SHARD[kind]}/{names[shard]}"


def flip(run: Path, relative: str, offset: float) -> None:
    path = run / relative
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset)] ^= 0x10
    path.write_bytes(bytes(data))


def expected_to_do(kinds: list[str], stages_units: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in kinds:
        for stage_name, n in CASCADE[kind].items():
            n = stages_units[stage_name] if n == "all" else n
            counts[stage_name] = min(stages_units[stage_name], counts.get(stage_name, 0) + n)
    return counts


def check_plan(baseline, out: Path, damaged: dict[str, str]) -> dict:
    """The plan of a damaged run: exactly ``damaged`` ({file: owning stage}) listed first, and the
    units to do what the cascade of each says."""
    planned = Rebalancer(str(baseline["corpus"]), str(out), baseline["recipe"], LOCAL).plan()
    assert sorted((d["stage"], Path(d["file"]).relative_to(out).as_posix()) for d in planned["damaged"]) == \
        sorted((stage, rel) for rel, stage in damaged.items())
    console = Console(record=True, width=250)
    plan.render_plan(planned, console)
    lines = console.export_text().splitlines()
    assert all(line.startswith("to do: ") and "is damaged" in line for line in lines[:len(damaged)])
    assert not lines[len(damaged)].startswith("to do: ")
    return planned


def to_do(planned: dict) -> dict[str, int]:
    return {row["stage"]: row["to_do"] for row in planned["stages"] if row["to_do"] and row["note"] != "rewritten by every run"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", list(PER_SHARD) + list(SINGLE))
def test_plan_lists_a_damaged_output_first_with_what_read_it(baseline, out, kind, offset):
    relative = per_shard_file(out, kind, 1) if kind in PER_SHARD else SINGLE[kind]
    assert (out / relative).stat().st_size >= SIZE_FLOOR[kind] > 2 * 65536  # a middle the old edge check missed
    flip(out, relative, offset)
    planned = check_plan(baseline, out, {relative: OWNER[kind]})
    units = {row["stage"]: row["units"] for row in planned["stages"]}
    assert to_do(planned) == expected_to_do([kind], units)


@pytest.mark.timeout(300)
def test_plan_names_every_damaged_file_when_upstream_damage_hides_their_identity(baseline, out):
    """A damaged sample/models/solution leaves assign's and weigh's identity unknown (what it comes
    from is redone): their units are to do anyway, and the plan still names their damaged files."""
    damaged = {}
    for j, kind in enumerate(PER_SHARD):  # shard j's kind j, besides every single file
        relative = per_shard_file(out, kind, j)
        flip(out, relative, OFFSETS[j])
        damaged[relative] = OWNER[kind]
    more, kinds = single_file_flips(out, 0)
    damaged.update(more)
    planned = check_plan(baseline, out, damaged)
    units = {row["stage"]: row["units"] for row in planned["stages"]}
    assert to_do(planned) == expected_to_do([*PER_SHARD, *kinds], units)


def test_cli_plan_prints_the_damaged_unit_first(baseline, out, tmp_path):
    relative = per_shard_file(out, "tags", 2)
    flip(out, relative, 0.5)
    (tmp_path / "r.yaml").write_text(RECIPE)
    result = CliRunner().invoke(app, ["rebalance", str(baseline["corpus"]), "--out", str(out), "--recipe",
                                      str(tmp_path / "r.yaml"), "--plan"])
    lines = result.output.splitlines()
    assert result.exit_code == 0, result.output
    assert lines[0].startswith(f"to do: scan {Path(relative).stem}: {out}/{relative} is damaged (checksum differs"), lines[0]
    assert lines[1].startswith(f"{out}: resume; {SHARDS} shards")


def rerun_and_compare(baseline, out: Path, damaged: dict[str, str], kinds: list[str], executor: str = "local") -> None:
    planned = check_plan(baseline, out, damaged)
    assert to_do(planned) == expected_to_do(kinds, {row["stage"]: row["units"] for row in planned["stages"]})
    redone: list[str] = []
    options = RunOptions(executor=executor, show_progress=False, html_report=False, on_progress=lambda n, s: redone.append(n))
    rebalance(str(baseline["corpus"]), str(out), baseline["recipe"], options)
    assert run_outputs(out, markers=True) == run_outputs(baseline["clean"], markers=True)
    per_unit = {k: v for k, v in to_do(planned).items() if stages.stage(k).unit != "global"}
    assert {s: redone.count(s) for s in set(redone)} == per_unit
    after = Rebalancer(str(baseline["corpus"]), str(out), baseline["recipe"], LOCAL).plan()
    assert not after["damaged"] and not to_do(after)


def per_shard_flips(out: Path, flips: list[tuple[str, int, float]]) -> tuple[dict[str, str], list[str]]:
    """Flip each (kind, shard, offset); returns the damaged files ({file: owning stage}) and their kinds."""
    damaged = {}
    for kind, shard, offset in flips:
        relative = per_shard_file(out, kind, shard)
        flip(out, relative, offset)
        damaged[relative] = OWNER[kind]
    return damaged, [kind for kind, _, _ in flips]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(PER_SHARD))
def test_rerun_redoes_each_offset_of_a_per_shard_kind_byte_identical(baseline, out, kind):
    # shard i flipped at offset i: every offset in one rerun
    damaged, kinds = per_shard_flips(out, [(kind, shard, offset) for shard, offset in enumerate(OFFSETS)])
    rerun_and_compare(baseline, out, damaged, kinds)


def single_file_flips(out: Path, rotation: int) -> tuple[dict[str, str], list[str]]:
    """The j-th of SINGLE flipped at offset (rotation + j) of OFFSETS."""
    damaged = {}
    for j, (kind, relative) in enumerate(SINGLE.items()):
        flip(out, relative, OFFSETS[(rotation + j) % len(OFFSETS)])
        damaged[relative] = OWNER[kind]
    return damaged, list(SINGLE)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rotation", range(len(OFFSETS)))
def test_rerun_redoes_the_sample_solution_and_models_at_every_offset_byte_identical(baseline, out, rotation):
    damaged, kinds = single_file_flips(out, rotation)
    rerun_and_compare(baseline, out, damaged, kinds)


RAY_KINDS = ("manifest", "assign", "signatures", "tags")


def ray_flips(rotation: int) -> list[tuple[str, int, float]]:
    """Rotation r flips shard s's kind (s + r) of RAY_KINDS at offset s of OFFSETS: over the four
    rotations each kind meets each offset. The odd rotations leave tags out, so they redo only
    what the other damage needs (a selective rerun on Ray); the even ones flip instead, besides
    their own, the tags the next rotation leaves out (another shard's file: each flip is found
    on its own)."""
    flips = []
    for shard, offset in enumerate(OFFSETS):
        kind, next_kind = (RAY_KINDS[(shard + rotation + i) % len(RAY_KINDS)] for i in (0, 1))
        if rotation % 2 == 0:
            flips.append((kind, shard, offset))
            if next_kind == "tags":
                flips.append(("tags", shard, offset))
        elif kind != "tags":
            flips.append((kind, shard, offset))
    return flips


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rotation", range(len(OFFSETS)))
def test_rerun_on_ray_redoes_per_shard_damage_byte_identical(baseline, out, ray_cluster, rotation):
    damaged, kinds = per_shard_flips(out, ray_flips(rotation))
    rerun_and_compare(baseline, out, damaged, kinds, executor="ray")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rerun_on_ray_redoes_the_sample_solution_and_models_byte_identical(baseline, out, ray_cluster):
    """Apart from the per-shard kinds: a damaged fit output leaves assign's identity (the models'
    digest) unknown, so --plan marks every assign unit to do without reading, or listing, their
    damage (a damaged solution likewise hides a damaged manifest); the rerun would repair them all
    the same."""
    damaged, kinds = single_file_flips(out, 1)
    rerun_and_compare(baseline, out, damaged, kinds, executor="ray")


# -- readers of a finished run ------------------------------------------------------------------


def one_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("mmbalance: error: "), (result.exit_code, result.stderr)
    return lines[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("reader, damaged_file", [
    (["export", "{out}", "-f", "datacomp"], "manifest"),
    (["report", "{out}"], "manifest"),
    (["inspect", "{out}"], "manifest"),
    (["inspect", "{out}"], "signatures/merged.parquet"),
    (["report", "{out}"], "report.json"),
])
def test_readers_refuse_a_damaged_run_file_naming_it(baseline, out, reader, damaged_file):
    relative = per_shard_file(out, "manifest", 2) if damaged_file == "manifest" else damaged_file
    flip(out, relative, 0.5)
    result = CliRunner().invoke(app, [a.format(out=out) for a in reader])
    line = one_line(result)
    assert f"{out}/{relative}: damaged run file" in line, line


@pytest.mark.timeout(300)
@pytest.mark.parametrize("reader", [["report"], ["export", "-f", "csv"]])
def test_a_reader_in_a_fresh_process_checks_what_it_reads(baseline, out, reader):
    """The store learns which marker records a file from the stages: a command that reads a run
    without running one loads them first. The manifest is rewritten as a valid Parquet file, so only
    its record in the done marker can tell."""
    relative = per_shard_file(out, "manifest", 1)
    pq.write_table(pq.read_table(out / relative).slice(1), out / relative)
    proc = subprocess.run([sys.executable, "-m", "mmbalance.cli", reader[0], str(out), *reader[1:]], capture_output=True,
                          text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and f"{out}/{relative}: damaged run file" in proc.stderr, (proc.returncode, proc.stderr)


def rewrite_manifest(out: Path, relative: str, edit) -> None:
    """A manifest edited in place, its done marker dropped (so no checksum vouches for it or against it)."""
    table = pq.read_table(out / relative)
    pq.write_table(edit(table), out / relative)
    (out / "_done" / "weigh" / f"{Path(relative).stem}.json").unlink()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("what, edit, needle", [
    ("negative", lambda w, r: (np.where(np.arange(len(w)) == 7, -5.87e96, w), r), "is negative, NaN or infinite"),
    ("nan", lambda w, r: (np.where(np.arange(len(w)) == 7, np.nan, w), r), "is negative, NaN or infinite"),
    ("infinite", lambda w, r: (np.where(np.arange(len(w)) == 7, np.inf, w), r), "is negative, NaN or infinite"),
    ("repeats", lambda w, r: (w, np.where(np.arange(len(r)) == 7, r + 5, r)), "is not weight"),
    ("negative repeats", lambda w, r: (w, np.where(np.arange(len(r)) == 7, -1, r)), "is not weight"),
])
def test_export_refuses_impossible_weights_and_repeats_naming_file_and_row(baseline, out, what, edit, needle):
    relative = per_shard_file(out, "manifest", 0)

    def change(table: pa.Table) -> pa.Table:
        w, r = edit(table.column("weight").to_numpy(), table.column("repeats").to_numpy())
        table = table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(w, pa.float64()))
        return table.set_column(table.schema.get_field_index("repeats"), "repeats", pa.array(r, table.schema.field("repeats").type))

    rewrite_manifest(out, relative, change)
    row = pq.read_table(out / relative, columns=["row"]).column("row")[7].as_py()
    line = one_line(CliRunner().invoke(app, ["export", str(out), "-f", "datacomp"]))
    assert f"{out}/{relative} row {row}: " in line and needle in line, line


def test_export_refuses_a_manifest_listing_a_row_twice(baseline, out):
    relative = per_shard_file(out, "manifest", 3)
    rewrite_manifest(out, relative, lambda t: pa.concat_tables([t, t.slice(10, 1)]))
    line = one_line(CliRunner().invoke(app, ["export", str(out), "-f", "datacomp"]))
    assert f"{out}/{relative} row " in line and "listed twice" in line, line


# -- what the run writes, and a run in progress ------------------------------------------------


def test_every_parquet_file_the_run_writes_carries_page_checksums(baseline):
    """(synth's shards and the Parquet exports: tests/test_cli.py and tests/operators/export/test_export.py)"""
    files = sorted(baseline["clean"].rglob("*.parquet"))
    assert len(files) > 6 * SHARDS
    for path in files:
        with pa.OSFile(str(path)) as handle:
            assert has_page_checksums(handle) in (True, None), path  # None: a file of zero rows


def test_plan_during_a_live_run_says_another_run_holds_the_lock(baseline, out):
    fd = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running rebalance holds
        planned = Rebalancer(str(baseline["corpus"]), str(out), baseline["recipe"], LOCAL).plan()
    finally:
        os.close(fd)
    assert planned["status"].startswith(f"another mmbalance run holds the lock on {out} and is writing to it now")
    assert Rebalancer(str(baseline["corpus"]), str(out), baseline["recipe"], LOCAL).plan()["status"] == "resume"
