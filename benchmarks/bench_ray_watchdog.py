"""CPU cost of the embedded Ray's watchdog (issue 13): the process that ends the local Ray's
processes when the driver is killed. Starts a driver with ``ray_session``, measures the watchdog's
CPU seconds at start-up and per second while it polls, and the time from ``kill -9`` of the driver
until none of that driver's processes is left.

    OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_ray_watchdog.py

Writes benchmarks/results/ray_watchdog.json (with the load average and the number of processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

DRIVER = """
import time
from mmbalance.pipeline.executor import ray_session
with ray_session(num_cpus=1):
    print("READY", flush=True)
    time.sleep(600)
"""


def alive(procs: list[psutil.Process]) -> list[int]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return left


def main(seconds: float = 20.0) -> None:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    out = {"loadavg_before": os.getloadavg(), "processes_on_machine": len(psutil.pids())}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        children = psutil.Process(proc.pid).children(recursive=True)
        watchdog = next(c for c in children if "select.select" in " ".join(c.cmdline()))
        start_cpu = sum(watchdog.cpu_times()[:2])
        t0 = time.monotonic()
        time.sleep(seconds)
        polling_cpu = sum(watchdog.cpu_times()[:2]) - start_cpu
        out["watchdog_startup_cpu_s"] = round(start_cpu, 3)
        out["watchdog_cpu_s_per_s"] = round(polling_cpu / (time.monotonic() - t0), 5)
        session = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t_kill = time.monotonic()
        while alive(session) and time.monotonic() - t_kill < 60:
            time.sleep(0.05)
        out["seconds_until_all_gone_after_kill_9"] = round(time.monotonic() - t_kill, 2)
        out["left_after_60s"] = alive(session)
    finally:
        if proc.poll() is None:
            proc.kill()
    out["loadavg_after"] = os.getloadavg()
    dest = Path(__file__).parent / "results" / "ray_watchdog.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
