"""Solve benchmark (issue 3): M4 solve time against signature count on the compressed path, the same
instances solved by cvxpy (CLARABEL) for the ratio, and a 1e9-row-equivalent problem.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_solve.py            # 1e3..1e6 signatures
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_solve.py --quick    # 1e3..1e5

Writes benchmarks/results/solve_m4.json. Instances: gender (woman/man/none) x 50 occupations with a
planted association x a high-cardinality label (e.g. a cluster id) that makes the signatures
distinct, plus a utility column so every signature keeps its own baseline (no grouping shortcut).
Counts are log-normal and scaled so the largest instance stands for 1e9 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.operators.solve import CorpusStats, solve  # noqa: E402
from mmbalance.operators.solve.m4.problem import build_problem  # noqa: E402
from mmbalance.schemas.recipe import parse_recipe  # noqa: E402

OCCUPATIONS = 50
BALANCE = {
    "method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
    "tolerance": {"representation": 0.01, "association": 0.0005}, "retention": 0.5, "max_weight": 1.0,
}


def instance(signatures: int, rows: float, seed: int = 0) -> CorpusStats:
    rng = np.random.default_rng(seed)
    clusters = max(1, signatures // (3 * OCCUPATIONS))
    s = signatures
    occ = rng.integers(0, OCCUPATIONS, s)
    cluster = rng.integers(0, clusters, s)
    p_woman = 0.2 + 0.6 * (occ / (OCCUPATIONS - 1))  # planted association, feasible at retention 0.5
    u = rng.random(s)
    gender = np.where(u < 0.15, None, np.where(u < 0.15 + 0.85 * p_woman, "woman", "man"))
    counts = rng.lognormal(0.0, 1.0, s)
    counts = np.maximum(1, np.round(counts / counts.sum() * rows)).astype(np.int64)
    utility = counts * (0.2 + 0.15 * rng.random(s))
    table = pa.table({
        "tag.gender": pa.array(gender.tolist(), pa.string()),
        "tag.occupation": pa.array([f"occ{o}" for o in occ], pa.string()),
        "tag.cluster": pa.array([f"c{c}" for c in cluster], pa.string()),
        "count": pa.array(counts, pa.int64()),
        "utility_sum": pa.array(utility, pa.float64()),
    })
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "utility": "clip_score"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation"}, {"name": "cluster"}],
        "balance": BALANCE,
    })
    vocab = {"gender": ["woman", "man"], "occupation": [f"occ{o}" for o in range(OCCUPATIONS)],
             "cluster": [f"c{c}" for c in range(clusters)]}
    # distinct signatures: duplicates of (gender, occupation, cluster) would merge in the real group-by
    return CorpusStats(recipe, table, vocab, int(counts.sum()))


def cvxpy_solve(stats: CorpusStats) -> dict:
    """The same instance (same B, eta, weights) as a QP in cvxpy, solved by CLARABEL."""
    import cvxpy as cp

    step = stats.recipe.balance
    p, _, _, _ = build_problem(step, stats)
    q = cp.Variable(len(p.weight))
    wB = (p.B.multiply(p.weight[:, None])).T.tocsr()
    W = (p.A.multiply(p.weight[:, None])).T.tocsr() @ q
    moments = wB @ q
    cons = [q >= 0, q <= p.max_weight, cp.abs(moments) <= cp.multiply(p.eps, W[p.group]), p.weight @ q == p.budget]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(p.weight, cp.square(q - p.eta)))), cons)
    t = time.perf_counter()
    prob.solve(solver=cp.CLARABEL)
    wall = time.perf_counter() - t
    return {"status": prob.status, "seconds": wall, "solver_seconds": prob.solver_stats.solve_time,
            "objective_per_row": float(prob.value)}


def run(signatures: int, rows: float, with_cvxpy: bool) -> dict:
    stats = instance(signatures, rows)
    t = time.perf_counter()
    sol = solve(stats)
    total = time.perf_counter() - t
    d = sol.diagnostics
    out = {
        "signatures": d["signatures"], "rows_equivalent": stats.total_rows, "duals": d["constraints"],
        "seconds_total": round(total, 4), "seconds_dual_solve": d["solver"]["seconds"],
        "lbfgsb_iterations": d["solver"]["lbfgsb_iterations"], "polish_iterations": d["solver"]["polish_iterations"],
        "dual_evaluations": d["solver"]["dual_evaluations"], "status": d["status"],
        "max_violation": d["max_violation"], "kkt_residual": d["kkt_residual"],
        "relative_duality_gap": d["relative_duality_gap"], "objective_per_row": d["objective_per_row"],
        "retention": d["retention"], "binding": len(d["binding"]),
    }
    if with_cvxpy:
        ref = cvxpy_solve(stats)
        out["cvxpy"] = ref
        out["speedup_vs_cvxpy"] = round(ref["seconds"] / total, 1)
        out["objective_relative_difference"] = abs(ref["objective_per_row"] - d["objective_per_row"]) / abs(ref["objective_per_row"])
    print(json.dumps({k: v for k, v in out.items() if k != "cvxpy"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cvxpy-max", type=int, default=100_000, help="largest signature count also solved by cvxpy")
    args = ap.parse_args()
    sizes = [1_000, 10_000, 100_000] + ([] if args.quick else [1_000_000])
    results = [run(s, rows=1e9 * s / 1_000_000, with_cvxpy=s <= args.cvxpy_max) for s in sizes]
    out = {
        "benchmark": "m4 compressed solve vs signature count",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS")},
        "balance": BALANCE,
        "results": results,
    }
    path = Path(__file__).resolve().parent / "results" / "solve_m4.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
