"""Time scripts/setup_consumers.sh from nothing (a fresh environment in a temporary directory) and
again when it is up to date; writes benchmarks/results/setup_consumers.json.

    python benchmarks/bench_setup_consumers.py [--keep DIR]

Downloads from PyPI unless pip's cache already holds the wheels (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="build the environment here and keep it (default: a temporary directory)")
    args = ap.parse_args()
    target = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mmb-consumers-")) / "venv"
    if target.exists():
        shutil.rmtree(target)
    env = {**os.environ, "MMBALANCE_CONSUMERS_VENV": str(target)}
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    cached_before = _du(cache) if cache.exists() else 0
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_consumers.sh")], check=True, env=env, cwd=ROOT)
    fresh = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "scripts" / "setup_consumers.sh")], check=True, env=env, cwd=ROOT)
    again = time.perf_counter() - t0
    result = {
        "fresh_install_s": round(fresh, 1),
        "rerun_up_to_date_s": round(again, 2),
        "environment_bytes": _du(target),
        "pip_cache_bytes_before": cached_before,
        "requirements": (ROOT / "scripts" / "consumers-requirements.txt").read_text().split("\n"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    out = ROOT / "benchmarks" / "results" / "setup_consumers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(target.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
