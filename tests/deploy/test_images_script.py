"""The deploy images' scripts outside an image: scripts/test_images.sh without podman (a clear skip on a
workstation, a failure in CI) and the CUDA image's health check, deploy/healthcheck-gpu.sh.

The images themselves are built and run by scripts/test_images.sh (a CI step of its own, minutes to
build); here its prerequisite handling runs with a PATH that holds every tool of this machine except
podman, and the health check runs against this environment's faiss and torch (no GPU here) and
against stand-ins for a healthy node and a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "test_images.sh"
HEALTHCHECK = ROOT / "deploy" / "healthcheck-gpu.sh"


@pytest.fixture
def path_without_podman(tmp_path):
    """A PATH of links to every executable on this PATH, podman left out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if entry.name != "podman" and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_dir)


def run(path: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "CI"}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, "PATH": path, **env}, capture_output=True, text=True, timeout=60)


def test_without_podman_it_skips_with_a_clear_line(path_without_podman):
    assert shutil.which("podman", path=path_without_podman) is None
    res = run(path_without_podman)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "SKIP images podman not found: apt-get install podman runc debootstrap to build and test the deploy images"
    ]


def test_without_podman_in_ci_it_fails(path_without_podman):
    res = run(path_without_podman, CI="true")
    assert res.returncode == 1
    assert res.stdout.splitlines() == ["FAIL images podman not found (CI is set): apt-get install podman runc debootstrap"]


def test_an_unknown_option_is_refused():
    res = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown option --bogus" in res.stderr


def health(python_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{python_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["sh", str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=240)


def stand_in(tmp_path: Path, body: str) -> str:
    """A directory whose ``python`` runs ``body`` (a shell script) instead of the check."""
    (tmp_path / "python").write_text(f"#!/bin/sh\n{body}\n")
    (tmp_path / "python").chmod(0o755)
    return str(tmp_path)


def test_healthcheck_without_a_gpu_fails_in_one_line_with_every_reason(tmp_path):
    """This environment: faiss-cpu and torch without a GPU, the real faiss_build check."""
    res = health(stand_in(tmp_path, f'exec {sys.executable} "$@"'))
    assert res.returncode == 1
    assert res.stdout.count("\n") == 1 and res.stderr == ""
    line = res.stdout.strip()
    assert line.startswith("unhealthy: faiss has no GPU support (faiss-cpu installed)")
    assert "; torch sees 0 CUDA devices, 1 required" in line


def test_healthcheck_on_a_healthy_node_prints_the_report(tmp_path):
    report = {"distributions": {"faiss-gpu-cu12": "1.14.1"}, "gpu_build": True, "num_gpus": 1}
    res = health(stand_in(tmp_path, f"echo 'a warning on stderr' >&2; echo '{json.dumps(report)}'; exit 0"))
    assert res.returncode == 0 and json.loads(res.stdout) == report


def test_healthcheck_when_the_check_crashes_reports_its_last_line(tmp_path):
    res = health(stand_in(tmp_path, "echo 'Traceback (most recent call last):'; echo 'ImportError: libcudart.so.12' >&2; exit 1"))
    assert (res.returncode, res.stdout) == (1, "unhealthy: ImportError: libcudart.so.12\n")
