"""Write the pinned requirements the deploy images install: deploy/requirements-cpu.txt and -cuda.txt.

    .venv/bin/python deploy/lock.py            # rewrite both from pyproject.toml and this .venv
    .venv/bin/python deploy/lock.py --check    # exit 1 if either file is out of date (no writing)

Each file is pip's own resolution (``pip install --dry-run --report``, from PyPI only, this machine's
pip configuration ignored) of what the image needs: the base dependencies, the ``jobs`` and ``s3`` extras
(CPU), plus ``embed`` and the GPU faiss build in place of faiss-cpu (CUDA). Every distribution the
development environment has installed is pinned to its version there (the versions the test suite ran
with, local ``+cu...`` labels dropped); the rest resolves to the newest release that fits. Ray is the
``rayVersion`` of deploy/kuberay. The two images join one Ray cluster, so they must agree on Python and
every shared package: both are resolved for the same Python (this interpreter's, the base image's
python3), and tests/deploy checks that they agree.

The result is for Linux x86-64 and this Python minor version (markers are evaluated here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAY_VERSION = "2.60.0"  # = spec.rayVersion of deploy/kuberay/*.yaml (tests/deploy checks it)
PYPI = "https://pypi.org/simple"


def image_requirements(kind: str) -> list[str]:
    """The top-level requirements of one image (mmbalance itself is installed from source, --no-deps)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, extras = pyproject["project"], pyproject["project"]["optional-dependencies"]
    # the build backend too: the image builds mmbalance with --no-build-isolation, from pinned setuptools
    reqs = [*project["dependencies"], *extras["jobs"], *extras["s3"], f"ray[default,data]=={RAY_VERSION}", *pyproject["build-system"]["requires"]]
    if kind == "cuda":
        sys.path.insert(0, str(ROOT))
        from mmbalance.faiss_build import CPU_REQUIREMENT, GPU_REQUIREMENT

        faiss_cpu = re.split(r"[<>=!~ \[]", CPU_REQUIREMENT)[0]
        reqs = [r for r in reqs if re.split(r"[<>=!~ \[;]", r)[0] != faiss_cpu]
        reqs += [*extras["embed"], GPU_REQUIREMENT]
    return reqs


def installed_pins(python: str) -> list[str]:
    """``name==version`` of every distribution in ``python``'s environment, local labels dropped."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                         capture_output=True, text=True, check=True, env=pip_env()).stdout
    return [f"{d['name']}=={d['version'].split('+')[0]}" for d in json.loads(out) if d["name"] != "mmbalance"]


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")  # PyPI only: no local indexes or caps
    return env


def resolve(requirements: list[str], constraints: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        req, con, report = (Path(tmp) / n for n in ("req.txt", "con.txt", "report.json"))
        req.write_text("\n".join(requirements) + "\n")
        con.write_text("\n".join(constraints) + "\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--index-url", PYPI,
             "--only-binary=:all:", "-r", str(req), "-c", str(con), "--report", str(report)],
            check=True, env=pip_env(),
        )
        items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in items}


def render(kind: str, pins: dict[str, str], requirements: list[str]) -> str:
    head = [
        f"# Pinned requirements of deploy/Dockerfile{'' if kind == 'cpu' else '.cuda'}: written by deploy/lock.py, do not edit.",
        f"# Python {sys.version_info[0]}.{sys.version_info[1]}, Linux x86-64. Resolved from:",
        *(f"#   {r}" for r in requirements),
    ]
    return "\n".join([*head, *(f"{name}=={version}" for name, version in sorted(pins.items()))]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from a fresh resolution")
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="environment whose versions to pin")
    args = ap.parse_args(argv)
    constraints = installed_pins(args.python)
    stale = []
    for kind in ("cpu", "cuda"):
        requirements = image_requirements(kind)
        text = render(kind, resolve(requirements, constraints), requirements)
        path = DEPLOY / f"requirements-{kind}.txt"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)} ({text.count(chr(10)) - len(requirements) - 2} pins)")
    if stale:
        print(f"out of date: {', '.join(stale)}: run {sys.executable} deploy/lock.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
