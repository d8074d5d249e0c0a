"""Faults during a run, as an operator meets them: a Ray worker killed mid-stage, and an output
filesystem that is read-only or full (from the start, or turning so mid-run).

Filesystem cases run the CLI inside a private mount namespace (``unshare -m``) on a tmpfs mounted
there: nothing outside the namespace sees the mounts and they vanish with it, also if the test is
killed. Where mount namespaces are not permitted, those cases are skipped with that reason, and
the read-only case falls back to an output path whose parent is a regular file.

Runs use an embedded local Ray with the environment of ``mmbalance.jobs.local_cluster.cluster_env``
(loopback only, no usage stats), each CLI in its own session, cleaned up by process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards

from mmbalance.jobs.local_cluster import cluster_env
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.io.recipes import load_recipe
from mmbalance.synth import synth_corpus

pytestmark = [pytest.mark.ray]
ENV = cluster_env()
SHARDS = 8

# The outputs a done marker vouches for, per stage (see mmbalance/io/store.py).
OUTPUTS = {
    "scan": ["tags/{key}.parquet", "uids/{key}.parquet", "rejects/validate/{key}.parquet"],
    "signatures": ["signatures/{key}.parquet"],
    "weigh": ["manifest/{key}.parquet", "after/{key}.parquet"],
    "dedup": ["dedup/bucket-{key}.parquet"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """8 synth shards, the issue recipe, and a clean local run to compare with."""
    base = tmp_path_factory.mktemp("faults")
    synth_corpus(base / "corpus", rows=80_000, shards=SHARDS, seed=5, dim=32, images=False)
    (base / "r.yaml").write_text(RECIPE_FROM_ISSUE)
    rebalance(str(base / "corpus"), str(base / "clean"), load_recipe(base / "r.yaml"),
              RunOptions(executor="local", show_progress=False))
    size = sum(p.stat().st_size for p in (base / "clean").rglob("*") if p.is_file())
    return {"base": base, "corpus": base / "corpus", "recipe": base / "r.yaml", "clean": base / "clean", "bytes": size}


def cli(c: dict, out: Path | str, executor: str = "ray") -> list[str]:
    return [sys.executable, "-m", "mmbalance.cli", "rebalance", str(c["corpus"]), "--out", str(out),
            "--recipe", str(c["recipe"]), "--executor", executor, "--num-cpus", "2", "-q"]


def manifest(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "manifest").iterdir())}


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def check_nothing_half_done(run: Path) -> dict[str, int]:
    """Every done marker's outputs exist and are complete Parquet; every visible Parquet file is
    complete (writes are a temporary name, then a rename); report.json only with every weigh marker."""
    done = {}
    for stage, patterns in OUTPUTS.items():
        markers = sorted((run / "_done" / stage).glob("*.json")) if (run / "_done" / stage).exists() else []
        for marker in markers:
            json.loads(marker.read_text())
            for pattern in patterns:
                path = run / pattern.format(key=marker.stem)
                if stage == "scan" and "rejects" in pattern and not path.exists():
                    continue
                pq.read_metadata(path)
        done[stage] = len(markers)
    for path in run.rglob("*.parquet"):
        if not path.name.startswith(".tmp-"):
            pq.read_metadata(path)
    if (run / "report.json").exists():
        json.loads((run / "report.json").read_text())
        assert done["weigh"] == SHARDS
    return done


def kill_group(proc: subprocess.Popen) -> None:
    """The CLI and everything it started (its embedded Ray) share its session's process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


# -- a Ray worker killed mid-stage ------------------------------------------------------------------


def _stage_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """Ray workers of this CLI's embedded Ray that are running a per-shard task right now
    (Ray sets a busy worker's title to ``ray::<task>``, an actor's to ``ray::<class>.<method>``; the
    CLI's per-shard work runs in its pool's ``UnitWorker.run_units``)."""
    found = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and title.split()[0].endswith("run_units"):
            found.append(child)
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["scan", "weigh"])
def test_worker_killed_mid_stage_the_run_completes_with_identical_manifest(corpus, tmp_path, stage):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(corpus, out), env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 200
        markers = out / "_done" / stage
        earlier = {"scan": None, "weigh": out / "_done" / "signatures"}[stage]
        while not killed and time.monotonic() < deadline and proc.poll() is None:
            ready = earlier is None or (earlier.exists() and len(list(earlier.glob("*.json"))) == SHARDS)
            finished = len(list(markers.glob("*.json"))) if markers.exists() else 0
            if ready and finished < SHARDS - 1:
                for worker in _stage_workers(proc):
                    try:
                        worker.send_signal(signal.SIGKILL)
                        killed.append(worker.pid)
                    except psutil.NoSuchProcess:
                        continue
                    break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert killed, f"no worker was running a {stage} task while the stage was unfinished"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert proc.returncode == 0, err[-3000:]
    assert manifest(out) == manifest(corpus["clean"])
    assert check_nothing_half_done(out)["weigh"] == SHARDS


# -- read-only and full output filesystems ------------------------------------------------------------

# Runs inside `unshare -m`: mounts a tmpfs at MNT (private to this namespace), runs the steps, writes
# what it saw to RESULT (outside the mount), and copies the run out to SNAPSHOT for inspection.
SCENARIO = r'''
import json, os, shutil, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
mnt, out = spec["mnt"], spec["out"]
def sh(*cmd):
    subprocess.run(cmd, check=True)
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
sh("mount", "-t", "tmpfs", "-o", spec["mount_options"], "tmpfs", mnt)
result = {}
proc = subprocess.Popen(spec["cli"], stderr=subprocess.PIPE, text=True, start_new_session=True)
if spec.get("remount_after"):
    # The run holds OUT/.lock open for writing, so the tmpfs itself cannot be remounted read-only
    # (EBUSY). Bind-mount OUT over itself and make that mount read-only: every path opened from now on
    # resolves through it, as on a filesystem the kernel turned read-only after an error.
    stage, count = spec["remount_after"]
    markers = os.path.join(out, "_done", stage)
    deadline = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(markers) and len([n for n in os.listdir(markers) if n.endswith(".json")]) >= count:
            # util-linux < 2.39 binds, then remounts read-only: a file the run opens through the new
            # bind in between makes the remount EBUSY; detach that bind and try again
            for _ in range(100):
                sh("mount", "--bind", out, out)
                if subprocess.run(["mount", "-o", "remount,bind,ro", out], stderr=subprocess.DEVNULL).returncode == 0:
                    result["remounted"] = True
                    break
                sh("umount", "-l", out)
                time.sleep(0.002)
            break
        time.sleep(0.005)
try:
    _, err = proc.communicate(timeout=240)
finally:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its embedded Ray, if any
    except ProcessLookupError:
        pass
result.update(rc=proc.returncode, stderr=err)
if os.path.exists(out):
    shutil.copytree(out, spec["snapshot"], symlinks=True)
if spec.get("rerun_with") == "unbind":
    sh("umount", out)
elif spec.get("rerun_with"):
    sh("mount", "-o", "remount," + spec["rerun_with"], mnt)
if spec.get("rerun_with"):
    rerun = subprocess.run(spec["rerun_cli"], capture_output=True, text=True, timeout=240, start_new_session=True)
    result.update(rerun_rc=rerun.returncode, rerun_stderr=rerun.stderr)
    if os.path.exists(os.path.join(out, "manifest")):
        shutil.copytree(os.path.join(out, "manifest"), spec["snapshot"] + "-rerun-manifest")
with open(spec["result"], "w") as f:
    json.dump(result, f)
'''


def _mount_namespaces_work(tmp: Path) -> str | None:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount not installed"
    probe = tmp / "probe"
    probe.mkdir()
    res = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --make-rprivate / && mount -t tmpfs -o size=1m tmpfs {probe} && touch {probe}/x"],
        capture_output=True, text=True, timeout=30,
    )
    if res.returncode != 0:
        return f"mount namespaces not permitted here ({res.stderr.strip()[:200]})"
    assert not (probe / "x").exists()  # the mount stayed inside the namespace
    return None


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    reason = _mount_namespaces_work(tmp_path_factory.mktemp("probe"))
    if reason:
        pytest.skip(reason)


def run_scenario(c: dict, tmp: Path, mount_options: str, executor: str = "ray", remount_after=None, rerun_with=None) -> dict:
    mnt = tmp / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    spec = {
        "mnt": str(mnt), "out": str(out), "mount_options": mount_options, "cli": cli(c, out, executor),
        # the resumed run: local executor (results are byte-identical across executors; saves a Ray start)
        "rerun_cli": cli(c, out, "local"),
        "result": str(tmp / "result.json"), "snapshot": str(tmp / "snapshot"),
        "remount_after": remount_after, "rerun_with": rerun_with,
    }
    subprocess.run(["unshare", "-m", sys.executable, "-c", SCENARIO, json.dumps(spec)], env=ENV, check=True, timeout=560)
    assert not any(mnt.iterdir())  # the tmpfs was private to the namespace
    result = json.loads((tmp / "result.json").read_text())
    result["snapshot"] = tmp / "snapshot"
    return result


@pytest.mark.timeout(120)
def test_read_only_output_filesystem_is_one_line_error(corpus, tmp_path, mounts):
    result = run_scenario(corpus, tmp_path, "ro,size=4m", executor="local")
    assert result["rc"] == 2  # what is wrong with the path, before any work
    line = one_error_line(result["stderr"])
    assert "read-only file system" in line and str(tmp_path / "mnt" / "out") in line, line
    assert not result["snapshot"].exists()  # nothing at all was written


@pytest.mark.timeout(120)
def test_output_under_a_regular_file_is_one_line_error(corpus, tmp_path):
    """Runs everywhere (no mounts needed): the output's parent is a file, so nothing can be created."""
    (tmp_path / "file").write_text("not a directory")
    res = subprocess.run(cli(corpus, tmp_path / "file" / "out", executor="local"), env=ENV, capture_output=True, text=True, timeout=100)
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert str(tmp_path / "file") in line and "is a file, not a directory" in line, line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_output_filesystem_local_executor(corpus, tmp_path, mounts):
    """A tmpfs with room for about a third of the run: one line naming the cause, nothing half-written
    visible as done; given room, the same command resumes to the identical manifest."""
    result = run_scenario(corpus, tmp_path, f"size={third_of_a_run(corpus)}k", executor="local", rerun_with="size=256m")
    assert result["rc"] != 0
    line = one_error_line(result["stderr"])
    assert "No space left on device" in line and f"(writing {tmp_path / 'mnt' / 'out'}/" in line, line
    check_interrupted_run(result, corpus)


@pytest.mark.timeout(120)
def test_full_output_filesystem_names_the_file_it_could_not_write(tmp_path, mounts):
    """A small corpus on a 96 KiB tmpfs: the error says which output could not be written."""
    small = {"corpus": write_shards(tmp_path / "corpus", {f"s{i}.parquet": held_out_table(400, i) for i in range(3)}),
             "recipe": tmp_path / "r.yaml"}
    small["recipe"].write_text(RECIPE_FROM_ISSUE)
    result = run_scenario(small, tmp_path, "size=96k", executor="local")
    assert result["rc"] == 1
    line = one_error_line(result["stderr"])
    assert "No space left on device" in line and f"(writing {tmp_path / 'mnt' / 'out'}/" in line, line


# The same faults with the Ray executor: each scenario runs once per module; what it left behind and
# its resumed rerun are one test, the error line another.


def third_of_a_run(c: dict) -> int:
    return max(64, c["bytes"] // 3 // 1024)


def check_interrupted_run(result: dict, c: dict) -> None:
    done = check_nothing_half_done(result["snapshot"])
    assert done["weigh"] < SHARDS and not (result["snapshot"] / "report.json").exists()
    assert not [p for p in result["snapshot"].rglob("*") if p.is_file() and p.stat().st_size == 0 and p.suffix == ".parquet"]
    assert result["rerun_rc"] == 0, result["rerun_stderr"][-3000:]
    rerun = {p.name: p.read_bytes() for p in sorted(Path(str(result["snapshot"]) + "-rerun-manifest").iterdir())}
    assert rerun == manifest(c["clean"])


@pytest.fixture(scope="module")
def full_fs_on_ray(corpus, tmp_path_factory, mounts):
    return run_scenario(corpus, tmp_path_factory.mktemp("full"), f"size={third_of_a_run(corpus)}k", rerun_with="size=256m")


@pytest.fixture(scope="module")
def read_only_mid_run_on_ray(corpus, tmp_path_factory, mounts):
    """Made read-only once two shards are scanned, then writable again for the rerun."""
    return run_scenario(corpus, tmp_path_factory.mktemp("ro-mid"), "size=256m", remount_after=["scan", 2], rerun_with="unbind")




@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_output_filesystem_on_ray_leaves_nothing_half_done_and_resumes(full_fs_on_ray, corpus):
    assert full_fs_on_ray["rc"] != 0
    check_interrupted_run(full_fs_on_ray, corpus)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_output_filesystem_on_ray_is_one_clear_line(full_fs_on_ray):
    line = one_error_line(full_fs_on_ray["stderr"])
    assert "No space left on device" in line and "(writing /" in line, line


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_output_turning_read_only_mid_run_leaves_nothing_half_done_and_resumes(read_only_mid_run_on_ray, corpus):
    result = read_only_mid_run_on_ray
    assert result.get("remounted"), result
    assert result["rc"] != 0
    assert 2 <= check_nothing_half_done(result["snapshot"])["scan"] < SHARDS
    check_interrupted_run(result, corpus)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_output_turning_read_only_mid_run_is_one_clear_line(read_only_mid_run_on_ray):
    assert "Read-only file system" in one_error_line(read_only_mid_run_on_ray["stderr"])
