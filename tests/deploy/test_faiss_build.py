"""The faiss build: one faiss distribution per install, and the step that swaps the CPU build for the GPU one.

faiss-cpu and faiss-gpu-cu12 write the same ``faiss/`` files, so no install of mmbalance (any extras)
may bring both; the GPU build replaces the CPU one through ``python -m mmbalance.faiss_build --use gpu``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mmbalance import faiss_build
from mmbalance.faiss_build import FaissInstallError, check_installation, replacement_commands

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def faiss_names(requirements: list[str]) -> list[str]:
    return [Requirement(r).name.lower() for r in requirements if Requirement(r).name.lower() in faiss_build.FAISS_DISTRIBUTIONS]


def test_base_has_one_faiss_build_and_no_extra_adds_another():
    assert faiss_names(PROJECT["dependencies"]) == ["faiss-cpu"]  # pip install mmbalance clusters out of the box
    assert Requirement(faiss_build.CPU_REQUIREMENT).name in faiss_names(PROJECT["dependencies"])
    for extra, requirements in PROJECT["optional-dependencies"].items():
        # an extra naming a faiss build would install it beside faiss-cpu: which imports is then undefined
        assert faiss_names(requirements) == [], extra
    assert Requirement(faiss_build.GPU_REQUIREMENT).name in faiss_build.FAISS_DISTRIBUTIONS


def test_check_installation_needs_exactly_one_build():
    check_installation({"faiss-cpu": "1.15.1"})
    check_installation({"faiss-gpu-cu12": "1.14.1"})
    with pytest.raises(FaissInstallError, match="faiss is not installed: pip install faiss-cpu"):
        check_installation({})
    with pytest.raises(FaissInstallError) as err:
        check_installation({"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1"})
    message = str(err.value)
    assert "\n" not in message and "which one imports is undefined" in message
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12" in message


def test_replacement_uninstalls_every_build_before_installing_the_target():
    cmds = replacement_commands("gpu", {"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1"}, python="py")
    assert cmds == [["py", "-m", "pip", "uninstall", "-y", "faiss-cpu", "faiss-gpu-cu12"],
                    ["py", "-m", "pip", "install", faiss_build.GPU_REQUIREMENT]]
    assert replacement_commands("cpu", {}, python="py") == [["py", "-m", "pip", "install", faiss_build.CPU_REQUIREMENT]]
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        replacement_commands("cuda", {})


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmbalance.faiss_build", *args], capture_output=True, text=True, timeout=120)


def test_check_reports_this_install_and_refuses_missing_gpus():
    import faiss

    done = run_check()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["distributions"]) == 1 and report["version"] == faiss.__version__
    assert report["gpu_build"] == hasattr(faiss, "StandardGpuResources")
    if report["gpu_build"] and report["num_gpus"] > 0:
        pytest.skip("faiss sees a GPU here: the refusal below cannot be shown")
    refused = run_check("--require-gpus", "1")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert lines and all(ln.startswith("faiss_build: ") for ln in lines)
    assert ("--use gpu" in lines[0]) if not report["gpu_build"] else ("sees 0 GPUs" in lines[0])


def test_import_faiss_names_the_fix(monkeypatch):
    import faiss

    assert faiss_build.import_faiss() is faiss  # this environment: exactly one build
    monkeypatch.setattr(faiss_build, "installed_distributions", lambda: {})
    with pytest.raises(FaissInstallError, match="faiss is not installed: pip install faiss-cpu"):
        faiss_build.import_faiss()
    monkeypatch.setattr(faiss_build, "installed_distributions", lambda: {"faiss-cpu": "1", "faiss-gpu-cu12": "1"})
    with pytest.raises(FaissInstallError, match="2 faiss builds are installed"):
        faiss_build.import_faiss()
