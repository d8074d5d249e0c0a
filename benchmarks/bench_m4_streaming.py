"""M4 streaming path (per-row utility baselines): solve time against rows.

Rows are generated in memory as shards of tags + utility, streamed through the solver exactly as
the pipeline's KeptRows does; the solver keeps them as on-disk blocks and streams them once per
dual evaluation. ``--executor local``: the blocks are reduced in this process (LocalBlocks);
``--executor ray``: the pipeline's ShardBlocks scheme on its RayExecutor, one Ray task per shard
block per dual evaluation (``m4.block_sums`` on the block file) and a fixed-order sum in the
driver. Writes benchmarks/results/m4_streaming.json (one entry per executor x rows).

    python benchmarks/bench_m4_streaming.py --rows 1000000 3000000 10000000
    python benchmarks/bench_m4_streaming.py --executor ray --rows 10000000
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

from mmbalance.operators.solve import CorpusStats, solve
from mmbalance.operators.stats import merge, summarise
from mmbalance.schemas.contract import UTILITY_COLUMN
from mmbalance.schemas.recipe import parse_recipe

OCCUPATIONS = [f"occ{i}" for i in range(40)]


def shard(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    occ = rng.integers(0, len(OCCUPATIONS), rows)
    p_woman = 0.2 + 0.6 * (occ / len(OCCUPATIONS))
    woman = rng.random(rows) < p_woman
    person = rng.random(rows) > 0.15
    gender = np.where(person, np.where(woman, "woman", "man"), None)
    return pa.table({
        "tag.gender": pa.array(gender.tolist(), pa.string()),
        "tag.occupation": pa.array(np.array(OCCUPATIONS)[occ].tolist(), pa.string()),
        UTILITY_COLUMN: rng.gamma(2.0, 0.15, rows),
    })


class Shards:
    def __init__(self, tables, ray: bool = False):
        self.parts = tables
        self.ray = ray

    def tables(self, columns):
        for t in self.parts:
            yield t.select(columns)

    def blocks(self):
        from mmbalance.operators.solve.m4 import LocalBlocks

        return RayBlocks(self) if self.ray else LocalBlocks(self)


def _reduce_block(task: dict) -> dict:
    from mmbalance.operators.solve.m4 import block_sums

    with np.load(task["block"]) as block:
        t = np.load(task["t"])["t"] if task["t"] else None
        return {"index": task["index"], "part": block_sums(block["sig"], block["u"], task["kind"], t, task["params"])}


class RayBlocks:
    """ShardBlocks on the RayExecutor: blocks on disk, a Ray task per block per dual evaluation."""

    def __init__(self, rows: Shards):
        from mmbalance.operators.solve.m4 import LocalBlocks
        from mmbalance.pipeline.executor import RayExecutor

        self.local = LocalBlocks(rows)  # writes the blocks; reduced here on Ray instead
        self.executor = RayExecutor()
        self.calls = 0

    def build(self, keys):
        return self.local.build(keys)

    def reduce(self, kind, t, params):
        self.calls += 1
        t_path = None
        if t is not None:
            t_path = f"{self.local.dir}/t-{self.calls:06d}.npz"
            np.savez(t_path, t=np.asarray(t, np.float64))
        tasks = [{"index": i, "block": path, "t": t_path, "kind": kind, "params": params}
                 for i, path in enumerate(self.local.files)]
        parts = {r["index"]: r["part"] for r in self.executor.map(_reduce_block, tasks)}
        total = None
        for i in range(len(tasks)):  # a fixed order: the same sums on every rerun
            total = parts[i] if total is None else total + parts[i]
        return total

    def close(self):
        self.local.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--rows-per-shard", type=int, default=500_000)
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "m4_streaming.json")
    args = parser.parse_args()
    recipe = parse_recipe({
        "input": {"columns": {"utility": "u"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                    "associate": [["gender", "occupation"]], "retention": 0.6, "max_weight": 1.0,
                    "on_infeasible": "max_retention"},
    })
    import contextlib

    from mmbalance.pipeline.executor import ray_session

    results = []
    # the embedded Ray exactly as a pipeline run starts it (idle workers end after 0.5 s)
    session = ray_session(num_cpus=2, object_store_mb=300) if args.executor == "ray" else contextlib.nullcontext()
    with session:
        run_all(args, recipe, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()).get("results", []) if args.out.exists() else []
    keep = [r for r in previous if (r.get("executor", "local"), r["rows"]) not in {(e["executor"], e["rows"]) for e in results}]
    for r in keep:
        r.setdefault("executor", "local")
    args.out.write_text(json.dumps({"benchmark": "M4 streaming path (per-row utility) solve time vs rows, in-process and on Ray",
                                    "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "command": " ".join(["python", *sys.argv]),
                                    "results": keep + results}, indent=2) + "\n")
    print(f"wrote {args.out}")


def run_all(args, recipe, results: list) -> None:
    for rows in args.rows:
        n_shards = max(1, rows // args.rows_per_shard)
        tables = [shard(rows // n_shards, seed) for seed in range(n_shards)]
        sig = merge([summarise(t, ["tag.gender", "tag.occupation"]) for t in tables], ["tag.gender", "tag.occupation"])
        stats = CorpusStats(recipe, sig, {"gender": ["woman", "man"], "occupation": OCCUPATIONS}, rows, rows=Shards(tables, ray=args.executor == "ray"))
        start = time.perf_counter()
        solution = solve(stats)
        seconds = time.perf_counter() - start
        d = solution.diagnostics
        entry = {"executor": args.executor, "loadavg": [round(x, 2) for x in os.getloadavg()], "rows": rows, "shards": n_shards, "signatures": d["signatures"], "seconds": round(seconds, 3),
                 "dual_evaluations": d["solver"]["dual_evaluations"], "status": d["status"],
                 "max_violation": d["max_violation"], "relative_duality_gap": d["relative_duality_gap"],
                 "seconds_per_evaluation_per_1e6_rows": round(seconds / d["solver"]["dual_evaluations"] / (rows / 1e6), 5)}
        results.append(entry)
        print(json.dumps(entry), flush=True)
        del tables, stats


if __name__ == "__main__":
    main()
