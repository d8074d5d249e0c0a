"""Resident memory of one ``mmbalance rebalance`` by process kind and stage: where the summed peak sits.

Runs the rebalance in a subprocess and samples every process of it every 0.1 s (as
bench_rebalance.py does for its peak), grouping by the stage whose done marker was written last
(per-unit stages write one per unit, so a row covers the stage after it until its first marker).
Prints the largest RSS per process kind per stage and the summed peak with each process at it.

    OMP_NUM_THREADS=1 python benchmarks/rss_by_stage.py CORPUS RECIPE OUT [--executor ray|local]

(bench_rebalance.py's corpus and recipe: /tmp/mmbalance-bench/corpus-1000000-512-25000 and recipe.yaml.)
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rebalance import process_kind, stage_in_progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus")
    parser.add_argument("recipe")
    parser.add_argument("out", type=Path, help="the run's output directory (removed first)")
    parser.add_argument("--executor", default="ray")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "mmbalance.cli", "rebalance", args.corpus, "--out", str(args.out),
                             "--recipe", args.recipe, "--executor", args.executor, "-q"], env=env, start_new_session=True)
    root = psutil.Process(proc.pid)
    kinds: dict[int, str] = {}
    by_stage: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    peak: tuple[int, str | None, list] = (0, None, [])
    while proc.poll() is None:
        stage = stage_in_progress(args.out) or "(none yet)"
        by_kind: dict[str, int] = collections.defaultdict(int)
        each = []
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in members:
            try:
                kinds.setdefault(p.pid, process_kind(p, root))
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            by_kind[kinds[p.pid]] += rss
            each.append((kinds[p.pid], rss >> 20))
        for kind, rss in by_kind.items():
            by_stage[stage][kind] = max(by_stage[stage][kind], rss >> 20)
        total = sum(by_kind.values()) >> 20
        if total > peak[0]:
            peak = (total, stage, sorted(each))
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"rebalance exited {proc.returncode}")
    for stage, kinds_mb in by_stage.items():
        print(f"last marker {stage:12s} " + ", ".join(f"{k} {v} MB" for k, v in sorted(kinds_mb.items())))
    print(f"summed peak {peak[0]} MB, last marker {peak[1]}: " + ", ".join(f"{k} {mb}" for k, mb in peak[2]))


if __name__ == "__main__":
    main()
