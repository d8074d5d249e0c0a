"""M4 streaming path (per-row utility baselines): solve time against rows.

Rows are generated in memory as shards of tags + utility, streamed through the solver exactly as
the pipeline's KeptRows does; the solver keeps them as on-disk blocks and streams them once per
dual evaluation. ``--executor local``: the blocks are reduced in this process (LocalBlocks);
``--executor ray``: the pipeline's ShardBlocks scheme on its RayExecutor, one Ray task per shard
block per dual evaluation (``m4.stream.block_sums`` on the block file) and a fixed-order sum in the
driver. Writes benchmarks/results/m4_streaming.json (one entry per executor x rows x components).

``--embedding-components 0 64`` runs each size without and with embedding moments (issue 21):
each row also carries a 64-d image embedding (gender shifts it along a few directions, occupation
along others), [gender, embedding.image] is associated at eps_E = 0.01 on all 64 principal
components (fitted on the first shard), and the solve runs on the per-row path: blocks hold the
projected embeddings, every dual evaluation is one map over them (``m4.rows.row_block_sums``).
Shards are generated on the fly from their seeds, so memory stays at one shard.

    python benchmarks/bench_m4_streaming.py --rows 1000000 3000000 10000000
    python benchmarks/bench_m4_streaming.py --executor ray --rows 10000000
    python benchmarks/bench_m4_streaming.py --executor ray --rows 10000000 --embedding-components 0 64
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


def shard(rows: int, seed: int, dim: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    occ = rng.integers(0, len(OCCUPATIONS), rows)
    p_woman = 0.2 + 0.6 * (occ / len(OCCUPATIONS))
    woman = rng.random(rows) < p_woman
    person = rng.random(rows) > 0.15
    gender = np.where(person, np.where(woman, "woman", "man"), None)
    columns = {
        "tag.gender": pa.array(gender.tolist(), pa.string()),
        "tag.occupation": pa.array(np.array(OCCUPATIONS)[occ].tolist(), pa.string()),
        UTILITY_COLUMN: rng.gamma(2.0, 0.15, rows),
    }
    if dim:  # occupation centres plus a gender shift along the first directions, plus noise
        centres = np.random.default_rng(12345).normal(size=(len(OCCUPATIONS), dim)).astype(np.float32)
        x = centres[occ] + rng.normal(size=(rows, dim)).astype(np.float32)
        x[:, :4] += np.where(woman, 0.4, -0.4)[:, None].astype(np.float32)
        columns["image_emb"] = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim)
    return pa.table(columns)


class Shards:
    """Shards written once to Parquet (untimed), read shard by shard: one shard in memory at a time."""

    def __init__(self, directory: Path, rows_per_shard: int, seeds: list[int], dim: int = 0, ray: bool = False):
        import pyarrow.parquet as pq

        self.paths = []
        for seed in seeds:
            path = directory / f"shard-{seed:05d}-{dim}.parquet"
            if not path.exists():
                pq.write_table(shard(rows_per_shard, seed, dim), path)
            self.paths.append(path)
        self.ray = ray

    def tables(self, columns):
        import pyarrow.parquet as pq

        for path in self.paths:
            yield pq.read_table(path, columns=columns)

    def blocks(self):
        self.made = RayBlocks(self) if self.ray else TimedBlocks(self)
        return self.made


def _timed_build(fn):
    def build(self, *args):
        start = time.perf_counter()
        try:
            return fn(self, *args)
        finally:
            self.build_seconds = time.perf_counter() - start
    return build


def _local_blocks():
    from mmbalance.operators.solve.m4.stream import LocalBlocks

    class Timed(LocalBlocks):
        """LocalBlocks that record how long writing the blocks took (reading, projecting)."""

        build = _timed_build(LocalBlocks.build)
        build_rows = _timed_build(LocalBlocks.build_rows)

    return Timed


def TimedBlocks(rows):  # noqa: N802 - a class made on first use (the solver module loads with it)
    return _local_blocks()(rows)


def _build_block(task: dict) -> dict:
    """One shard's row block, on a Ray worker: read it, project its embeddings, write the arrays."""
    import os

    import polars as pl
    import pyarrow.parquet as pq

    from mmbalance.operators.solve.m4.rows import RowSpec, block_totals, row_block, table_embeddings

    spec = RowSpec.from_files(task["spec"], {"class_of_sig": np.load(task["class_of_sig"])})
    keys = pl.read_parquet(task["keys"])
    table = pq.read_table(task["path"], columns=spec.columns(keys))
    block = row_block(table, keys, spec, table_embeddings(table, spec))
    os.makedirs(task["out"])
    for name, array in block.items():
        np.save(f"{task['out']}/{name}.npy", array)
    return {"index": task["index"], **block_totals(block)}

def _reduce_block(task: dict) -> dict:
    from mmbalance.operators.solve.m4.stream import load_block, reduce_block

    block = load_block(task["block"])
    payload = None
    if task["t"]:
        with np.load(task["t"]) as data:
            payload = {k: data[k] for k in data.files}
    return {"index": task["index"], "part": reduce_block(block, task["kind"], payload, task["params"])}


class RayBlocks:
    """ShardBlocks on the RayExecutor: blocks on disk, a Ray task per block per dual evaluation."""

    def __init__(self, rows: Shards):
        from mmbalance.operators.solve.m4.stream import LocalBlocks
        from mmbalance.pipeline.executor import RayExecutor

        self.local = LocalBlocks(rows)  # writes the blocks; reduced here on Ray instead
        self.rows = rows
        self.executor = RayExecutor()
        self.calls = 0

    @_timed_build
    def build(self, keys):
        return self.local.build(keys)

    @_timed_build
    def build_rows(self, keys, spec):
        """One Ray task per shard, as the pipeline's ShardBlocks."""
        import tempfile

        self.local.dir = tempfile.mkdtemp(prefix="mmbalance-m4-stream-")
        meta, arrays = spec.to_files()
        keys.write_parquet(f"{self.local.dir}/keys.parquet")
        np.save(f"{self.local.dir}/class_of_sig.npy", arrays["class_of_sig"])
        tasks = [{"index": i, "path": str(path), "out": f"{self.local.dir}/{i:06d}", "spec": meta,
                  "keys": f"{self.local.dir}/keys.parquet", "class_of_sig": f"{self.local.dir}/class_of_sig.npy"}
                 for i, path in enumerate(self.rows.paths)]
        done = {r["index"]: r for r in self.executor.map(_build_block, tasks)}
        self.local.files = [t["out"] for t in tasks]
        return {k: sum(done[i][k] for i in range(len(tasks))) for k in ("rows", "sum_u", "sum_omega", "sum_omega_u")}

    def iter_blocks(self):
        return self.local.iter_blocks()

    def reduce(self, kind, t, params):
        self.calls += 1
        t_path = None
        if t is not None:
            t_path = f"{self.local.dir}/t-{self.calls:06d}.npz"
            np.savez(t_path, **(t if isinstance(t, dict) else {"t": np.asarray(t, np.float64)}))
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
    parser.add_argument("--embedding-components", type=int, nargs="+", default=[0],
                        help="0: the utility-only problem; K: also [gender, embedding.image] on K components of a K-d embedding")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "m4_streaming.json")
    args = parser.parse_args()
    import contextlib

    from mmbalance.pipeline.executor import ray_session

    results = []
    # the embedded Ray exactly as a pipeline run starts it (idle workers end after 0.5 s)
    session = ray_session(num_cpus=2, object_store_mb=300) if args.executor == "ray" else contextlib.nullcontext()
    with session:
        run_all(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()).get("results", []) if args.out.exists() else []
    done = {(e["executor"], e["rows"], e.get("embedding_components", 0)) for e in results}
    keep = [r for r in previous if (r.get("executor", "local"), r["rows"], r.get("embedding_components", 0)) not in done]
    for r in keep:
        r.setdefault("executor", "local")
    args.out.write_text(json.dumps({"benchmark": "M4 streaming path (per-row utility) solve time vs rows, in-process and on Ray",
                                    "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "command": " ".join(["python", *sys.argv]),
                                    "results": keep + results}, indent=2) + "\n")
    print(f"wrote {args.out}")


def recipe_for(components: int):
    associate = [["gender", "occupation"]] + ([["gender", "embedding.image"]] if components else [])
    return parse_recipe({
        "input": {"columns": {"utility": "u", **({"image_embedding": "emb"} if components else {})}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                    "associate": associate, "retention": 0.6, "max_weight": 1.0, "on_infeasible": "max_retention",
                    **({"tolerance": {"association_embedding": 0.01}, "embedding_components": components} if components else {})},
    })


def run_all(args, results: list) -> None:
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="mmbalance-bench-stream-"))
    try:
        _run_all(args, results, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_all(args, results: list, work: Path) -> None:
    from mmbalance.operators.arrays import embedding_matrix
    from mmbalance.operators.pca import fit_pca

    columns = ["tag.gender", "tag.occupation"]
    for components in args.embedding_components:
        recipe = recipe_for(components)
        for rows in args.rows:
            n_shards = max(1, rows // args.rows_per_shard)
            stream = Shards(work, rows // n_shards, list(range(n_shards)), components, ray=args.executor == "ray")
            sig = merge([summarise(t, columns) for t in stream.tables(columns + [UTILITY_COLUMN])], columns)
            bases = {}
            if components:
                first = shard(rows // n_shards, 0, components)
                bases["image"] = fit_pca(*embedding_matrix(first.column("image_emb")), components, "image")
                del first
            stats = CorpusStats(recipe, sig, {"gender": ["woman", "man"], "occupation": OCCUPATIONS}, rows, rows=stream,
                                embedding_bases=bases)
            start = time.perf_counter()
            solution = solve(stats)
            seconds = time.perf_counter() - start
            d = solution.diagnostics
            entry = {"executor": args.executor, "embedding_components": components,
                     "block_build_seconds": round(stream.made.build_seconds, 3),
                     "loadavg": [round(x, 2) for x in os.getloadavg()], "rows": rows, "shards": n_shards,
                     "signatures": d["signatures"], "seconds": round(seconds, 3),
                     "dual_evaluations": d["solver"]["dual_evaluations"], "row_passes": d["solver"].get("row_passes"),
                     "status": d["status"], "binding": d["binding_constraints"],
                     "max_violation": d["max_violation"], "relative_duality_gap": d["relative_duality_gap"],
                     "seconds_per_evaluation_per_1e6_rows": round(seconds / d["solver"]["dual_evaluations"] / (rows / 1e6), 5)}
            results.append(entry)
            print(json.dumps(entry), flush=True)
            del stats


if __name__ == "__main__":
    main()
