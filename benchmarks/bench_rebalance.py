"""Throughput and peak memory of ``mmbalance rebalance`` (method: cap) against the fastest plain read.

For each corpus size: generate a synth corpus (512-d fp16 embeddings, no images; 25k rows a shard
by default, i.e. 160 shards at 4M rows: the small-shard case where per-task overhead shows), then
per executor, back to back: read exactly the columns rebalance reads with ``pyarrow.dataset`` (the
baseline: every core for Ray, one thread for the local executor, which runs on one core; default
batch size), then run ``mmbalance rebalance`` in a subprocess while sampling the resident memory of
its whole process tree (driver and Ray workers). The figures of merit:

- Ray: ``read_over_stages`` = all-core read seconds / the summed wall seconds of the run's stages
  (1.0: the whole pipeline costs one read of the mapped columns; issue 25 asks >= 0.8 at 4M rows);
- local: ``stages_over_one_thread_read`` = summed stage seconds / one-thread read seconds (issue 25
  asks <= 1.2).

The old figure, a single-stream scan file by file in 16,384-row batches (``single_stream_scan``,
``scan_over_stages``), is kept beside them. The corpus is read once untimed first, so every figure is
from the page cache. Then one more run per executor under py-spy (``run_profile.py``: CPU seconds
by process, by the driver's stage, top functions), at the largest size unless ``--profile-rows``.
The load average is recorded before and after each measurement: on a shared machine the figures
are only comparable at similar load. Writes benchmarks/results/rebalance.json.
``--base-source DIR --repeat N``: an A/B against another revision's tree (``git archive REV | tar -x
-C DIR``), the two alternating, N runs each, with medians.

    python benchmarks/bench_rebalance.py --rows 1000000 4000000 --executors ray local
"""

from __future__ import annotations

import argparse
import collections
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
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_profile import profile_run, scan_cpu_profile  # noqa: E402

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


def dataset_read(corpus: Path, threads: bool) -> dict:
    """The fastest plain read of the mapped columns: pyarrow.dataset over every file, its default
    batch size, on every core (``threads``) or on one; wall and this process's CPU seconds."""
    load_before = load()
    pa.set_cpu_count(os.cpu_count() if threads else 1)  # not OMP_NUM_THREADS=1, which Arrow follows
    cpu, start = time.process_time(), time.perf_counter()
    rows = 0
    for batch in ds.dataset(corpus, format="parquet").to_batches(columns=COLUMNS, use_threads=threads):
        rows += batch.num_rows
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - cpu, 3),
            "rows_per_s": round(rows / seconds), "threads": "all cores" if threads else "one",
            "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load()}


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


RAY_DAEMON_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def process_kind(proc: psutil.Process, root: psutil.Process) -> str:
    """driver (the rebalance process), ray worker (a task or actor process), ray daemon, or other
    (the run's watchdog)."""
    if proc.pid == root.pid:
        return "driver"
    command = " ".join(proc.cmdline())
    if command.startswith(RAY_DAEMON_TITLES) or "/ray/" in command and "_worker.py" not in command:
        return "ray daemon"
    if command.startswith("ray::") or "default_worker.py" in command or "setup_worker.py" in command:
        return "ray worker"
    return "other"


def tree_sample(proc: psutil.Process, kinds: dict[int, str], cpu: dict[int, float]) -> tuple[int, int, dict[str, int]]:
    """(RSS, PSS, RSS by process kind) summed over the process and its children; notes each one's
    CPU seconds so far in ``cpu`` (by pid; ``kinds`` remembers what each pid was). Summed RSS counts
    a shared page (libraries, Ray's object store) once per process that maps it; PSS splits it."""
    rss = pss = 0
    by_kind: dict[str, int] = {}
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # a child exited while we listed them
        return 0, 0, {}
    for p in members:
        try:
            if p.pid not in kinds:
                kinds[p.pid] = process_kind(p, proc)
            info = p.memory_full_info()
            times = p.cpu_times()
            cpu[p.pid] = times.user + times.system
            rss += info.rss
            pss += info.pss
            by_kind[kinds[p.pid]] = by_kind.get(kinds[p.pid], 0) + info.rss
        except psutil.Error:
            pass
    return rss, pss, by_kind


def stage_in_progress(out: Path) -> str | None:
    """The stage whose done markers were written last (the one running, or the one just finished)."""
    try:
        return max((d for d in (out / "_done").iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime).name
    except (OSError, ValueError):
        return None


def cpu_by_kind(kinds: dict[int, str], cpu: dict[int, float]) -> dict[str, float]:
    """CPU seconds (user + system) per process kind, each process as last sampled (up to 0.1 s short
    for one that exited between samples): unlike wall time, little moved by other jobs' load."""
    out: dict[str, float] = {}
    for pid, seconds in cpu.items():
        out[kinds[pid]] = out.get(kinds[pid], 0.0) + seconds
    return {k: round(v, 2) for k, v in sorted(out.items())}


def run_rebalance(corpus: Path, out: Path, recipe: Path, executor: str, source: Path | None = None) -> dict:
    """One timed run; ``source``: the mmbalance source tree to run (another revision's, for an A/B)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out),
           "--recipe", str(recipe), "--executor", executor, "-q"]
    load_before = load()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ps = psutil.Process(proc.pid)
    peak = peak_pss = 0
    peak_by_kind: dict[str, int] = {}
    peak_stage = None
    kinds: dict[int, str] = {}
    cpu: dict[int, float] = {}
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_pss, peak_by_kind, peak_stage
        while not stop.is_set():
            rss, pss, by_kind = tree_sample(ps, kinds, cpu)
            if rss > peak:
                peak, peak_by_kind, peak_stage = rss, by_kind, stage_in_progress(out)
            peak_pss = max(peak_pss, pss)
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
        "peak_rss_mb_by_process_kind": {k: round(v / 2**20, 1) for k, v in sorted(peak_by_kind.items())},
        "peak_rss_after_stage": peak_stage,
        "cpu_seconds_by_process_kind": cpu_by_kind(kinds, cpu),
        "processes_by_kind": dict(sorted(collections.Counter(kinds.values()).items())),
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": load(),
    }


def medians(runs: list[dict]) -> list[dict]:
    """Per executor and source: the median summed stage seconds and stage seconds over the repeats."""
    import statistics

    out = []
    for key in dict.fromkeys((r["executor"], r["source"]) for r in runs):
        same = [r for r in runs if (r["executor"], r["source"]) == key]
        stages = sorted({k for r in same for k in r["stage_seconds"]})
        out.append({"executor": key[0], "source": key[1], "runs": len(same),
                    "summed_stage_seconds": round(statistics.median(r["summed_stage_seconds"] for r in same), 3),
                    "stage_seconds": {k: round(statistics.median(r["stage_seconds"].get(k, 0.0) for r in same), 3) for k in stages},
                    "cpu_seconds_by_process_kind": {k: round(statistics.median(r["cpu_seconds_by_process_kind"].get(k, 0.0) for r in same), 2)
                                                    for k in sorted({k for r in same for k in r["cpu_seconds_by_process_kind"]})},
                    "peak_rss_mb_process_tree": max(r["peak_rss_mb_process_tree"] for r in same)})
    return out


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


def reprofile(args: argparse.Namespace, recipe: Path) -> None:
    """The py-spy profiles of an existing result file redone (e.g. after run_profile.py changed),
    with the command that redid them recorded beside the file's own."""
    payload = json.loads(args.out.read_text())
    rows = args.profile_rows or max(e["rows"] for e in payload["results"])
    entry = next(e for e in payload["results"] if e["rows"] == rows)
    corpus = bench_corpus(args.work, rows, args.dim, args.rows_per_shard)
    entry["profile"] = [profile_run(corpus, recipe, args.work / f"profile-{rows}-{executor}", executor)
                        for executor in args.executors]
    payload["profile_command"] = " ".join(["python", *sys.argv])
    payload["profile_loadavg_1_5_15_at_end"] = load()
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--executors", nargs="+", default=["local", "ray"])
    parser.add_argument("--profile-rows", type=int, default=None, help="profile the runs at this size (default: the largest)")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--base-source", type=Path, default=None,
                        help="A/B: also run this mmbalance source tree (git archive REV | tar -x -C DIR), alternating with this one")
    parser.add_argument("--repeat", type=int, default=1, help="runs per executor (and per source)")
    parser.add_argument("--profile-only", action="store_true",
                        help="only redo the py-spy profiles of an existing --out file's profiled size (its other figures kept)")
    corpus_options(parser, "rebalance.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.work / "recipe.yaml"
    recipe.write_text(RECIPE)
    if args.profile_only:
        reprofile(args, recipe)
        return
    sources = [("this tree", None)] + ([(f"base {args.base_source}", args.base_source)] if args.base_source else [])
    results = []
    for rows in args.rows:
        corpus = bench_corpus(args.work, rows, args.dim, args.rows_per_shard)
        entry = {"rows": rows, "shards": len(list(corpus.glob("*.parquet"))), "dim": args.dim,
                 "bytes_on_disk": sum(p.stat().st_size for p in corpus.glob("*.parquet"))}
        bare_scan(corpus, 16384)  # untimed: the page cache holds the corpus for every measurement after
        entry["single_stream_scan"] = bare_scan(corpus, 16384)
        entry["rebalance"] = []
        for executor in args.executors:
            threads = executor != "local"  # the local executor runs on one core
            for rep in range(args.repeat):
                # an A/B alternates which tree runs first, so a drift in the machine's load favours neither
                order = sources if rep % 2 == 0 else sources[::-1]
                for label, source in order:
                    read = dataset_read(corpus, threads)  # back to back with the run
                    res = {"source": label, **run_rebalance(corpus, args.work / f"out-{rows}-{executor}", recipe, executor, source)}
                    res["baseline_read"] = read
                    res["throughput_vs_baseline_read"] = round(res["rows_per_s"] / read["rows_per_s"], 3)
                    if threads:
                        res["read_over_stages"] = round(read["seconds"] / res["summed_stage_seconds"], 3)
                    else:
                        res["stages_over_one_thread_read"] = round(res["summed_stage_seconds"] / read["seconds"], 3)
                    res["scan_over_stages"] = round(entry["single_stream_scan"]["seconds"] / res["summed_stage_seconds"], 3)
                    entry["rebalance"].append(res)
                    print(json.dumps(res), flush=True)
        if len(sources) > 1 or args.repeat > 1:
            entry["medians"] = medians(entry["rebalance"])
        if rows == (args.profile_rows or max(args.rows)) and not args.no_profile:
            entry["profile"] = [profile_run(corpus, recipe, args.work / f"profile-{rows}-{executor}", executor)
                                for executor in args.executors]
            entry["scan_cpu_profile"] = scan_cpu_profile(corpus, recipe)
        results.append(entry)
        print(json.dumps({"rows": rows, "single_stream_scan": entry["single_stream_scan"]}), flush=True)
    by_exec = {}
    for executor in args.executors:
        peaks = [next(r for r in e["rebalance"] if r["executor"] == executor and r["source"] == "this tree")["peak_rss_mb_process_tree"]
                 for e in results]
        if len(peaks) > 1:
            by_exec[executor] = round(peaks[-1] / peaks[0], 3)
    payload = {
        "benchmark": "rebalance (cap) vs the fastest plain read of the same columns (pyarrow.dataset)",
        "definitions": {
            "baseline_read": "pyarrow.dataset to_batches of the mapped columns, default batch size, warm cache, measured just "
                             "before the run: every core (use_threads) for Ray, one thread for the local executor",
            "read_over_stages": "Ray: baseline_read.seconds / summed_stage_seconds (issue 25: >= 0.8 at 4M rows)",
            "stages_over_one_thread_read": "local: summed_stage_seconds / one-thread baseline_read.seconds (issue 25: <= 1.2)",
            "single_stream_scan": "the old baseline: ParquetFile.iter_batches file by file, 16,384-row batches, one stream",
            "scan_over_stages": "single_stream_scan.seconds / summed_stage_seconds (the old figure, issue 13)",
            "profile": "one more run per executor under py-spy (run_profile.py): CPU seconds by process kind and by the "
                       "driver's stage, seconds spent importing, top functions; stage_seconds_under_profiler are slowed by it. "
                       "py-spy counts a thread that waits for a core as busy (on a loaded machine trust the shares less), and it "
                       "samples only threads running Python: the Parquet decode runs on Arrow's own threads and is mostly "
                       "missing, so for the scan use scan_cpu_profile or bench_scan_instructions.py",
            "scan_cpu_profile": "4 scan units in one process under cProfile with a CPU clock (load does not move the shares), "
                                "beside a plain read of the same shards' mapped columns (read_cpu_s_same_rows)",
            "summed_stage_seconds": "sum of report.json stage_seconds: inspect, every stage's wall time, report, export",
            "throughput_vs_baseline_read": "whole command (process start, Ray start/stop included) rows/s over the baseline read's",
            "peak_rss_mb_process_tree": "largest sum of RSS over the rebalance process and all its children (Ray), sampled every 0.1 s",
            "peak_pss_mb_process_tree": "the same for PSS (shared pages split between the processes that map them)",
            "peak_rss_mb_by_process_kind": "that peak's RSS by process: driver, ray worker, ray daemon, other (the watchdog)",
            "peak_rss_after_stage": "the stage whose done markers were written last at that peak (running, or just finished)",
            "cpu_seconds_by_process_kind": "user + system CPU seconds per process kind over the run (psutil, every 0.1 s)",
            "peak_rss_ratio_largest_vs_smallest": "peak RSS at the largest corpus / at the smallest, per executor (flat: about 1)",
            "loadavg_1_5_15": "os.getloadavg() before and after each measurement; compare figures only at similar load",
            "stages": "per-unit distributions from stats/stages.json: seconds per unit p50/p95/max, slowest units",
            "source": "which mmbalance ran: this tree, or --base-source (an A/B, alternating which runs first)",
            "medians": "with --repeat or --base-source: per executor and source, medians over the runs (peak RSS: the largest)",
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
