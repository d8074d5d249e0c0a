"""The embedded Ray's footprint: what a worker imports, which daemons start, and that the driver's
global steps begin only after the per-shard workers have exited."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
HEAVY = ("numba", "scipy", "polars", "pandas", "sklearn", "matplotlib", "torch", "faiss")


@pytest.mark.parametrize("imports, allowed", [
    ("import mmbalance.pipeline.stages", ()),  # what every worker unpickling a stage function loads
    # what the weigh stage adds: applying a solution needs polars' joins, not the solvers' scipy
    ("import mmbalance.pipeline.stages; from mmbalance.operators import stats, weigh; "
     "from mmbalance.operators.solve import solution_from_dict", ("polars",)),
])
def test_a_worker_loads_no_heavy_library_its_stage_does_not_use(imports, allowed):
    # a heavy import is paid once per worker process (numba alone was ~100 MB of RSS each)
    code = f"import sys, json; {imports}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120, check=True)
    assert sorted(json.loads(out.stdout)) == sorted(allowed)


EMBEDDED = r"""
import json, os, psutil
from mmbalance.pipeline.executor import RayExecutor, ray_session

def daemons():
    names = []
    for p in psutil.Process().children(recursive=True):
        try:
            names.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return names

with ray_session(num_cpus=2) as embedded:
    executor = RayExecutor(settle_workers=embedded)
    results = list(executor.map(dict, [{"i": i} for i in range(6)], sizes=[1] * 6))
    pids = set(executor._worker_pids)
    executor.settle(timeout_s=20)
    print(json.dumps({
        "embedded": embedded,
        "results": sorted(r["i"] for r in results),
        "workers": len(pids),
        "alive_after_settle": [p for p in pids if psutil.pid_exists(p)],
        "processes": daemons(),
    }))
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_embedded_ray_runs_without_monitors_and_settles_its_workers():
    out = subprocess.run([sys.executable, "-c", EMBEDDED], capture_output=True, text=True, env=ENV, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["embedded"] is True
    assert got["results"] == list(range(6))
    assert got["workers"] >= 1
    assert got["alive_after_settle"] == []  # idle workers exit, and settle() waited for them
    commands = got["processes"]
    assert any("raylet" in c for c in commands), commands  # the listing does see Ray's daemons
    # a fixed one-node Ray has nothing to autoscale, and no one reads forwarded logs
    assert not [c for c in commands if "autoscaler/_private/monitor.py" in c or "log_monitor.py" in c], commands
