"""The embedded Ray's footprint: what a worker imports, which daemons start, that one pool of workers
serves every per-unit stage, and that the driver's last global steps begin only after it has exited."""

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
    executor = RayExecutor(pool=embedded)
    maps = []
    for stage in range(3):  # three per-unit stages, back to back
        results = list(executor.map(dict, [{"i": i} for i in range(6)], sizes=[1] * 6))
        maps.append({"results": sorted(r["i"] for r in results), "workers": sorted(executor._worker_pids)})
    workers = [p for p in psutil.Process().children(recursive=True) if "UnitWorker" in " ".join(p.cmdline())]
    environment = [p.environ().get("OMP_NUM_THREADS") for p in workers]
    pids = set(executor._worker_pids)
    executor.release()
    print(json.dumps({
        "embedded": embedded,
        "maps": maps,
        "environment": environment,
        "alive_after_release": [p for p in pids if psutil.pid_exists(p)],
        "processes": daemons(),
    }))
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_embedded_ray_runs_every_stage_on_one_pool_without_monitors_and_releases_it():
    # 3 threads: not what Ray would give a 1-CPU worker itself, so seeing it proves the inheritance
    env = {**ENV, "OMP_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", EMBEDDED], capture_output=True, text=True, env=env, timeout=170)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["embedded"] is True
    assert [m["results"] for m in got["maps"]] == [list(range(6))] * 3
    first = got["maps"][0]["workers"]
    assert 1 <= len(first) <= 2  # one worker per CPU at most
    assert all(m["workers"] == first for m in got["maps"])  # the same processes: no worker start per stage
    assert got["environment"] == ["3"] * len(got["environment"]) and got["environment"]  # inherited, no runtime_env
    assert got["alive_after_release"] == []  # release() ended the pool and waited for it
    commands = got["processes"]
    assert any("raylet" in c for c in commands), commands  # the listing does see Ray's daemons
    # a fixed one-node Ray has nothing to autoscale, and no one reads forwarded logs
    assert not [c for c in commands if "autoscaler/_private/monitor.py" in c or "log_monitor.py" in c], commands
