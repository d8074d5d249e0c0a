"""Run-state faults a new user meets: the run lock, SIGTERM under ``--executor local``, an OUT inside
the input, and the embedded Ray's processes after a ``kill -9`` of the driver. Each ends in one line
naming the path (exit 2 for what the user can fix) or in a run that a rerun finishes with the manifest
of an uninterrupted run."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards
from signals import sigterm_when
from typer.testing import CliRunner

from mmbalance.cli import app
from mmbalance.jobs.local_cluster import cluster_env

ENV = cluster_env()


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def manifest(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "manifest").iterdir())}


@pytest.fixture
def small(tmp_path):
    corpus = write_shards(tmp_path / "corpus", {f"s{i}.parquet": held_out_table(300, i) for i in range(2)})
    (tmp_path / "r.yaml").write_text(RECIPE_FROM_ISSUE)
    return corpus, tmp_path / "r.yaml"


def rebalance_in_process(corpus: Path, out: Path, recipe: Path):
    args = ["rebalance", str(corpus), "--out", str(out), "--recipe", str(recipe), "--executor", "local", "-q"]
    return CliRunner().invoke(app, args)


def test_run_refused_by_the_lock_is_exit_2_and_one_line(small, tmp_path):
    corpus, recipe = small
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)  # another writer holds the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = rebalance_in_process(corpus, out, recipe)
    finally:
        os.close(fd)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert str(out) in line and "another mmbalance run is writing to this directory" in line
    assert rebalance_in_process(corpus, out, recipe).exit_code == 0  # once the lock is free


def test_out_inside_the_input_is_refused_up_front(small, tmp_path):
    corpus, recipe = small
    result = rebalance_in_process(corpus, corpus / "run", recipe)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert str(corpus / "run") in line and "inside the input" in line
    assert not (corpus / "run").exists()  # refused before anything was written


def test_input_inside_out_is_refused_up_front(small, tmp_path):
    corpus, recipe = small
    result = rebalance_in_process(corpus, tmp_path, recipe)  # --overwrite here would delete the corpus
    assert result.exit_code == 2
    assert "the input is inside the output directory" in one_error_line(result.stderr)


def test_out_under_a_skipped_name_inside_the_input_reruns_cleanly(small, tmp_path):
    """Discovery skips names starting with '_' or '.', so such an OUT is never read as input."""
    corpus, recipe = small
    out = corpus / "_runs" / "r1"
    first = rebalance_in_process(corpus, out, recipe)
    assert first.exit_code == 0, first.stderr
    before = manifest(out)
    again = rebalance_in_process(corpus, out, recipe)
    assert again.exit_code == 0, again.stderr
    assert manifest(out) == before and len(before) == 2


def test_validate_scratch_inside_the_input_is_not_read_as_input(small, monkeypatch):
    """``mmbalance validate`` runs into a temp dir; with TMPDIR inside the input it must still work."""
    import tempfile

    from mmbalance.pipeline.validate import validate_corpus
    from mmbalance.io.recipes import load_recipe

    corpus, recipe = small
    monkeypatch.setattr(tempfile, "tempdir", str(corpus))
    summary = validate_corpus(str(corpus), load_recipe(recipe), show_progress=False)
    assert summary["rows"] == 600 and summary["shards"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_sigterm_says_so_in_one_line_and_the_rerun_resumes(tmp_path, executor):
    corpus = write_shards(tmp_path / "corpus", {f"s{i:02d}.parquet": held_out_table(1000, i) for i in range(8)})
    (tmp_path / "r.yaml").write_text(RECIPE_FROM_ISSUE + "report: {html: false, leakage: false}\n")

    def cli(out: Path, executor: str) -> list[str]:
        return [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out),
                "--recipe", str(tmp_path / "r.yaml"), "--executor", executor, "--num-cpus", "1", "-q"]

    clean = rebalance_in_process(corpus, tmp_path / "clean", tmp_path / "r.yaml")
    assert clean.exit_code == 0, clean.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(out, executor), env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    started: list[psutil.Process] = []
    markers = out / "_done" / "scan"

    def remember_children() -> None:
        started.extend(psutil.Process(proc.pid).children(recursive=True))

    err = sigterm_when(proc, lambda: markers.exists() and any(markers.glob("*.json")), before=remember_children,
                       timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert one_error_line(err) == "mmbalance: error: terminated; rerun the same command to resume"
    assert not (out / "report.json").exists() and not list(out.rglob(".tmp-*"))
    deadline = time.monotonic() + 20  # the run's Ray (if any) is stopped with it
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(started), [(p.pid, p.name()) for p in _alive(started)]
    rerun = subprocess.run(cli(out, "local"), env=ENV, capture_output=True, text=True, timeout=200)
    assert rerun.returncode == 0, rerun.stderr
    assert manifest(out) == manifest(tmp_path / "clean")


# The driver of an embedded Ray, as `mmbalance rebalance` runs it.
DRIVER = """
import time
from mmbalance.pipeline.executor import ray_session
with ray_session(num_cpus=1):
    print("READY", flush=True)
    time.sleep(600)
"""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_embedded_ray_processes_die_with_a_driver_killed_by_sigkill():
    """Ray's own fate sharing (PDEATHSIG) ends the driver's children but not the raylet's
    (DashboardAgent, RuntimeEnvAgent); the session's watchdog ends those. Only processes that
    descend from this driver are looked at: other Ray sessions on the machine are not touched."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=ENV, stdout=subprocess.PIPE, text=True, start_new_session=True)
    session: list[psutil.Process] = []
    try:
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 60
        names: set[str] = set()
        while time.monotonic() < deadline:  # the agents start shortly after ray.init returns
            session = psutil.Process(proc.pid).children(recursive=True)
            names = set()
            for p in session:
                try:
                    names.add(" ".join(p.cmdline()).strip())
                except psutil.Error:
                    continue
            if {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
                break
            time.sleep(0.2)
        assert any("raylet" in n for n in names) and "ray::RuntimeEnvAgent" in names, names
        time.sleep(1.5)  # the watchdog polls once a second
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(session)
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        for p in _alive(session):
            p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
