"""Per-epoch domain share deviation of open_clip's resampled webdataset for tar sizes, stated
(mmbalance.operators.export.epoch) against simulated epochs; writes
benchmarks/results/epoch_deviation.json.

    python benchmarks/bench_epoch_deviation.py [--rows 3600] [--epochs 2000]

The corpus: 12 domains with seeded Dirichlet shares, every row one copy (copies: repeats, equal
tar factors). An epoch (``--train-num-samples`` = rows): tars drawn with replacement, each read
whole, cut at the epoch size, as open_clip's ResampledShards2 pipeline does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from mmbalance.operators.export.epoch import balanced_sizes, shard_size_for, share_deviation

ROOT = Path(__file__).resolve().parents[1]


def simulate(domain: np.ndarray, sizes: np.ndarray, weights: np.ndarray, n: int, epochs: int, ndomains: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = weights / weights.sum()
    per_epoch = int(np.ceil(n / sizes.min())) + 1  # enough draws to fill any epoch
    shares = np.zeros((epochs, ndomains))
    for e in range(epochs):
        draws = rng.choice(len(sizes), size=per_epoch, p=p)
        take = sizes[draws]
        cum = np.cumsum(take)
        last = int(np.searchsorted(cum, n))
        take = take[: last + 1].astype(float)
        take[-1] -= cum[last] - n
        np.add.at(shares[e], domain[draws[: last + 1]], take)
    return shares / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3600)
    ap.add_argument("--epochs", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.full(12, 1.0))
    rows = np.maximum(1, np.round(shares * args.rows)).astype(int)
    target = rows / rows.sum()
    n = int(rows.sum())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cases = []
    for label, size in [("10000 (old default)", 10_000), ("1000", 1000), ("100", 100),
                        ("auto, bound 0.02", shard_size_for(target.tolist(), n, 0.02, 10_000)),
                        ("auto, bound 0.01 (default)", shard_size_for(target.tolist(), n, 0.01, 10_000))]:
        dom, tar_sizes = [], []
        for j, r in enumerate(rows):
            b = balanced_sizes(int(r), size)
            dom += [j] * len(b)
            tar_sizes += b
        dom_a, sizes_a, w = np.array(dom), np.array(tar_sizes), np.ones(len(tar_sizes))
        _, stated = share_deviation(dom, tar_sizes, w.tolist(), n, len(rows))
        sim = simulate(dom_a, sizes_a, w, n, args.epochs, len(rows), seed=1)
        cases.append({
            "shard_size": label, "samples_per_tar": size, "tars": len(tar_sizes),
            "stated_max_sd": round(max(stated), 5),
            "simulated_max_sd": round(float(sim.std(axis=0, ddof=1).max()), 5),
            "simulated_over_stated_per_domain": [round(float(a / b), 3) if b > 0 else None
                                                 for a, b in zip(sim.std(axis=0, ddof=1), stated)],
            "worst_abs_share_error_any_epoch": round(float(np.abs(sim - target).max()), 4),
            "median_epoch_worst_abs_error": round(float(np.median(np.abs(sim - target).max(axis=1))), 4),
        })
    result = {"rows": n, "epoch_size": n, "domains": len(rows), "epochs": args.epochs,
              "target_shares": [round(float(t), 4) for t in target], "cases": cases,
              "seconds": round(time.perf_counter() - t0, 2), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    out = ROOT / "benchmarks" / "results" / "epoch_deviation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
