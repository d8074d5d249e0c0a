"""Throughput and peak memory of ``mmbalance rebalance`` (method: cap) against a bare scan.

For each corpus size: generate a synth corpus (512-d fp16 embeddings, no images; 25k rows a shard
by default, i.e. 160 shards at 4M rows: the small-shard case where per-task overhead shows), time
a bare pyarrow scan of exactly the columns rebalance reads, then run ``mmbalance rebalance`` in a
subprocess per executor while sampling the resident memory of its whole process tree (driver and
Ray workers). The figure of merit is ``scan_over_stages``: bare-scan seconds / the summed wall
seconds of the run's stages (1.0: the whole pipeline costs one bare read of the mapped columns).
The corpus is read once untimed first, so every figure is from the page cache (a cold first read
of the 4M corpus took 61 s against 38 s warm). The load average is recorded before and after each
measurement: on a shared machine the figures are only comparable at similar load. Writes benchmarks/results/rebalance.json.

    python benchmarks/bench_rebalance.py --rows 1000000 4000000 --executors ray local
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

RECIPE = """\
input:
  columns: {uid: uid, caption: caption, image_embedding: image_emb, text_embedding: text_emb}
attributes:
  - {name: gender, source: column, column: gender, values: [woman, man]}
labels:
  - {name: occupation, source: column, column: occupation}
balance: {method: cap, by: occupation, cap: 1000}
export: {seed: 0, formats: [parquet]}
"""
COLUMNS = ["uid", "caption", "image_emb", "text_emb", "gender", "occupation"]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def bare_scan(corpus: Path, batch_rows: int, verify_checksums: bool = False) -> dict:
    load_before = load()
    start = time.perf_counter()
    rows = 0
    for path in sorted(corpus.glob("*.parquet")):
        pfile = pq.ParquetFile(path, page_checksum_verification=verify_checksums)
        for batch in pfile.iter_batches(batch_size=batch_rows, columns=COLUMNS):
            rows += batch.num_rows
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds),
            "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load()}


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) summed over the process and its children. Summed RSS counts a shared page
    (libraries, Ray's object store) once per process that maps it; PSS splits it between them."""
    rss = pss = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # a child exited while we listed them
        return 0, 0
    for p in members:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += info.pss
        except psutil.Error:
            pass
    return rss, pss


def run_rebalance(corpus: Path, out: Path, recipe: Path, executor: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out),
           "--recipe", str(recipe), "--executor", executor, "-q"]
    load_before = load()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak = peak_pss = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        while not stop.is_set():
            rss, pss = tree_memory(ps)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"rebalance failed: {err}")
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]["input"]
    per_unit = {name: {k: st[k] for k in ("units", "task_seconds", "wall_seconds", "seconds_per_unit", "slowest") if k in st}
                for name, st in report["stages"].items() if "units" in st}
    for st in per_unit.values():
        st["slowest"] = st.get("slowest", [])[:3]
    return {
        "executor": executor,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "stage_seconds": report["stage_seconds"],
        "summed_stage_seconds": round(sum(report["stage_seconds"].values()), 3),
        "stages": per_unit,
        "peak_rss_mb_process_tree": round(peak / 2**20, 1),
        "peak_pss_mb_process_tree": round(peak_pss / 2**20, 1),
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": load(),
    }


def corpus_options(parser: argparse.ArgumentParser, result: str) -> None:
    """The corpus and output options this benchmark shares with bench_checksums.py."""
    parser.add_argument("--rows-per-shard", type=int, default=25_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmbalance-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / result)
    parser.add_argument("--note", default="", help="how the machine was when measured (shared? other jobs?)")


def provenance(note: str) -> dict:
    """The machine, the command and the note every result file records."""
    return {"machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                        "python": platform.python_version(), "loadavg_1_5_15_at_end": load()},
            "command": " ".join(["python", *sys.argv]), "note": note}


def bench_corpus(work: Path, rows: int, dim: int, rows_per_shard: int) -> Path:
    """The synth corpus (no images) of this size, made once under ``work`` and reused."""
    from mmbalance.synth import synth_corpus

    corpus = work / f"corpus-{rows}-{dim}-{rows_per_shard}"
    if not (corpus / "_synth.json").exists():
        t = time.perf_counter()
        synth_corpus(corpus, rows, max(1, rows // rows_per_shard), seed=0, dim=dim, images=False)
        print(f"synth {rows} rows: {time.perf_counter() - t:.1f} s", flush=True)
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--executors", nargs="+", default=["local", "ray"])
    corpus_options(parser, "rebalance.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "recipe.yaml"
    recipe.write_text(RECIPE)
    results = []
    for rows in args.rows:
        corpus = bench_corpus(args.work, rows, args.dim, args.rows_per_shard)
        entry = {"rows": rows, "shards": len(list(corpus.glob("*.parquet"))), "dim": args.dim,
                 "bytes_on_disk": sum(p.stat().st_size for p in corpus.glob("*.parquet"))}
        bare_scan(corpus, 16384)  # untimed: the page cache holds the corpus for every measurement after
        entry["bare_scan"] = bare_scan(corpus, 16384)
        entry["rebalance"] = []
        for executor in args.executors:
            res = run_rebalance(corpus, args.work / f"out-{rows}-{executor}", recipe, executor)
            res["throughput_vs_bare_scan"] = round(res["rows_per_s"] / entry["bare_scan"]["rows_per_s"], 3)
            res["scan_over_stages"] = round(entry["bare_scan"]["seconds"] / res["summed_stage_seconds"], 3)
            entry["rebalance"].append(res)
            print(json.dumps(res), flush=True)
        results.append(entry)
        print(json.dumps({"rows": rows, "bare_scan": entry["bare_scan"]}), flush=True)
    by_exec = {}
    for executor in args.executors:
        peaks = [next(r for r in e["rebalance"] if r["executor"] == executor)["peak_rss_mb_process_tree"] for e in results]
        if len(peaks) > 1:
            by_exec[executor] = round(peaks[-1] / peaks[0], 3)
    payload = {
        "benchmark": "rebalance (cap) vs bare pyarrow scan of the same columns",
        "definitions": {
            "scan_over_stages": "bare_scan.seconds / summed_stage_seconds (acceptance of issue 13: >= 0.5 on Ray at 4M rows)",
            "summed_stage_seconds": "sum of report.json stage_seconds: inspect, every stage's wall time, report, export",
            "throughput_vs_bare_scan": "whole command (process start, Ray start/stop included) rows/s over bare-scan rows/s",
            "peak_rss_mb_process_tree": "largest sum of RSS over the rebalance process and all its children (Ray), sampled every 0.1 s",
            "peak_pss_mb_process_tree": "the same for PSS (shared pages split between the processes that map them)",
            "peak_rss_ratio_largest_vs_smallest": "peak RSS at the largest corpus / at the smallest, per executor (flat: about 1)",
            "loadavg_1_5_15": "os.getloadavg() before and after each measurement; compare figures only at similar load",
            "stages": "per-unit distributions from stats/stages.json: seconds per unit p50/p95/max, slowest units",
        },
        **provenance(args.note),
        "results": results,
        "peak_rss_ratio_largest_vs_smallest": by_exec,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
