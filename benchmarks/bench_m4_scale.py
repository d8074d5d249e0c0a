"""M4 solve time and memory against the number of labels and signatures (issue 12).

Signatures are (gender or null, age or null, one of k concepts with Zipf-like sizes, occupation
of 100 or null) with gender and age planted per concept and occupation; the recipe associates
gender x {occupation, concept} and age x concept at tolerance 0.002 (representation 0.01,
retention 0.6), so head concepts bind. Each point runs in its own process (peak RSS per point);
``solve_seconds`` is the dual solve (and any fallback), ``build_seconds`` the signature table ->
sparse problem. Writes benchmarks/results/m4_scale.json.

    python benchmarks/bench_m4_scale.py                       # the grid below
    python benchmarks/bench_m4_scale.py --big                 # adds 1e5 labels x 1e7 signatures
    python benchmarks/bench_m4_scale.py --per-label 0.05 --only 10000 1000000   # per-label parity (issue 21)

``--per-label EPS`` adds per-label parity |P_w(s | y = j) - pi| <= EPS on every associated pair
(label values under 50 carrying rows pooled) beside the global bound (``--no-global``: instead of
it) and writes benchmarks/results/m4_scale_per_label.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OCCUPATIONS = 100
# distinct signatures possible: 3 genders-or-null x 4 ages-or-null x k x 101 occupations-or-null
GRID = [(100, 10_000), (100, 100_000), (1000, 10_000), (1000, 100_000), (1000, 1_000_000),
        (10_000, 10_000), (10_000, 100_000), (10_000, 1_000_000), (100_000, 100_000), (100_000, 1_000_000)]
SKIPPED = [
    {"labels": 100, "signatures": 1_000_000, "reason": "out of reach: at most 3*4*100*101 = 121,200 distinct signatures"},
    {"labels": 100, "signatures": 10_000_000, "reason": "out of reach: at most 121,200 distinct signatures"},
    {"labels": 1000, "signatures": 10_000_000, "reason": "out of reach: at most 1,212,000 distinct signatures"},
    {"labels": 10_000, "signatures": 10_000_000,
     "reason": "needs ~1e8 drawn rows to reach 1e7 of the 1.2e7 possible signatures: generation, not the solve, is out of reach here"},
    {"labels": 100_000, "signatures": 10_000, "reason": "10^4 signatures carry at most 10^4 of the 10^5 labels: see 10^4 x 10^4"},
]
BIG = [(100_000, 10_000_000)]


def balance_for(per_label: float | None, global_bound: bool) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from operators.solve.m4_reference import CONCEPT_BALANCE

    if per_label is None:
        return CONCEPT_BALANCE
    tolerance = {**CONCEPT_BALANCE["tolerance"], "association_per_label": per_label}
    if not global_bound:
        tolerance["association"] = None
    return {**CONCEPT_BALANCE, "tolerance": tolerance}


def point(labels: int, signatures: int, per_label: float | None = None, global_bound: bool = True) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from operators.solve.m4_reference import concept_stats

    from mmbalance.operators.solve.m4 import diagnostics, problem as m4_problem, solve as m4_solve, solver

    balance = balance_for(per_label, global_bound)
    rows = int(1.3 * signatures)
    for _ in range(4):  # draw rows until the distinct signatures reach the target
        stats = concept_stats(0, labels, rows, balance, occupations=OCCUPATIONS)
        got = stats.signatures.num_rows
        if got >= 0.9 * signatures:
            break
        rows = int(rows * min(8.0, 1.15 * signatures / max(got, 1)))
    step = stats.recipe.balance
    start = time.perf_counter()
    problem, _, coords, notes = m4_problem.build_problem(step, stats)
    build = time.perf_counter() - start
    del stats
    tracemalloc.start()
    start = time.perf_counter()
    result = m4_solve.solve_moments(problem, None)
    status = "optimal"
    if result.max_violation > m4_solve.FEASIBILITY_TOL:
        certified = solver.certify(problem, result, None)
        status = "optimal (fallback)" if certified is not None else "not certified"
        result = certified or result
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    d = diagnostics.solve_diagnostics(problem, result, coords, step, None)
    return {
        "labels": labels, "target_signatures": signatures, "signatures": int(problem.B.shape[0]),
        "per_label": per_label, "global_bound": global_bound,
        "per_label_values": {k: {"bounded": v["bounded_values"], "pooled": len(v["pooled_values"])}
                             for k, v in notes.get("per_label", {}).items()} if per_label is not None else None,
        "drawn_rows": rows, "coordinates": problem.K, "duals": 2 * problem.K + (1 if problem.budget is not None else 0),
        "binding": d["binding_constraints"], "status": status, "method": result.info.get("method"),
        "build_seconds": round(build, 3), "solve_seconds": round(seconds, 3),
        "newton_iterations": result.info.get("newton_iterations"), "cg_iterations": result.info.get("cg_iterations"),
        "dual_evaluations": result.info.get("dual_evaluations"),
        "solve_peak_traced_mb": round(peak / 2**20, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "max_violation": d["max_violation"], "kkt_residual": d["kkt_residual"],
        "duality_gap_per_row": d["duality_gap"] / problem.rows, "relative_duality_gap": d["relative_duality_gap"],
        "retention": d["retention"], "loadavg": [round(x, 2) for x in os.getloadavg()],
        "threads": os.environ.get("OMP_NUM_THREADS"), "largest_weight": float(np.max(result.q)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--point", type=int, nargs=2, metavar=("LABELS", "SIGNATURES"))
    parser.add_argument("--big", action="store_true", help="add 1e5 labels x 1e7 signatures")
    parser.add_argument("--only", type=int, nargs=2, action="append", metavar=("LABELS", "SIGNATURES"))
    parser.add_argument("--per-label", type=float, default=None, help="per-label parity tolerance (issue 21)")
    parser.add_argument("--no-global", action="store_true", help="with --per-label: no global association bound")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(*args.point, per_label=args.per_label, global_bound=not args.no_global)), flush=True)
        return
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("m4_scale.json" if args.per_label is None else "m4_scale_per_label.json")
    extra = ([] if args.per_label is None else ["--per-label", str(args.per_label)]) + (["--no-global"] if args.no_global else [])
    grid = [tuple(p) for p in args.only] if args.only else GRID + (BIG if args.big else [])
    previous = json.loads(args.out.read_text()).get("results", []) if args.out.exists() else []
    results = {(r["labels"], r["target_signatures"]): r for r in previous}
    for labels, signatures in grid:
        proc = subprocess.run([sys.executable, __file__, "--point", str(labels), str(signatures), *extra],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if proc.returncode != 0:
            entry = {"labels": labels, "target_signatures": signatures, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            entry = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(labels, signatures)] = entry
        print(json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "M4 solve (sparse projected semismooth Newton on the dual) against labels x signatures",
        "recipe": "targets gender 50/50 (eps 0.01); associate gender x occupation, gender x concept, age x concept "
                  "(eps 0.002); retention 0.6; max_weight 1; L2"
                  + ("" if args.per_label is None else f"; per-label parity {args.per_label} (min_support 50)"
                     + (", no global bound" if args.no_global else "")),
        "targets": "1e4 labels x 1e6 signatures under 10 s; 1e5 labels under 60 s (2-core box)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "command": " ".join(["python", "benchmarks/bench_m4_scale.py", *sys.argv[1:]]),
        "results": sorted(results.values(), key=lambda r: (r["labels"], r["target_signatures"])),
        "skipped": SKIPPED + ([] if args.big or any(k == (100_000, 10_000_000) for k in results)
                              else [{"labels": 100_000, "signatures": 10_000_000, "reason": "run with --big"}]),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
