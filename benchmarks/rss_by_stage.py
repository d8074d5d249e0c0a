"""Resident memory of one ``mmbalance rebalance`` by process kind and stage: where the summed peak sits.

Runs the rebalance in a subprocess and samples every process of it every 0.1 s (bench_rebalance.py's
sampler), grouping by the stage whose done marker was written last
(per-unit stages write one per unit, so a row covers the stage after it until its first marker).
Prints the largest RSS per process kind per stage and the summed peak by process kind.

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
from bench_rebalance import stage_in_progress, tree_sample  # noqa: E402


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
    cpu: dict[int, float] = {}
    by_stage: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
    peak: tuple[int, str | None, dict[str, int]] = (0, None, {})
    while proc.poll() is None:
        stage = stage_in_progress(args.out) or "(none yet)"
        total, _, by_kind = tree_sample(root, kinds, cpu)
        for kind, rss in by_kind.items():
            by_stage[stage][kind] = max(by_stage[stage][kind], rss >> 20)
        if total > peak[0]:
            peak = (total, stage, by_kind)
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"rebalance exited {proc.returncode}")
    for stage, kinds_mb in by_stage.items():
        print(f"last marker {stage:12s} " + ", ".join(f"{k} {v} MB" for k, v in sorted(kinds_mb.items())))
    print(f"summed peak {peak[0] >> 20} MB, last marker {peak[1]}: " + ", ".join(f"{k} {v >> 20} MB" for k, v in sorted(peak[2].items())))


if __name__ == "__main__":
    main()
