"""What verifying costs: whole-file checksums of the run's outputs (done markers) and page CRCs of
the input (``execution.verify_checksums``, on by default), against the run they protect.

1. Checksum throughput, streamed in 1 MiB pieces from memory: xxh3-64 (the one the done markers
   use), xxh3-128, CRC32C (google-crc32c, when installed) and zlib's CRC-32.
2. On a synth corpus (512-d fp16 embeddings, no images, 25k rows a shard; the corpus of
   bench_rebalance.py, with page CRCs as synth writes them), ``mmbalance rebalance`` (cap) with
   ``verify_checksums`` on and off, in a subprocess, from the page cache (read once untimed first);
   and the CPU seconds of decoding the columns a run reads with and without page-CRC checks (the
   work the check adds, measured in one thread from memory: two whole runs differ by more noise).
3. On the finished run: the bytes its done markers record; hashing them from memory (what the
   writers add: outputs are checksummed as they are written, never read back); checking every
   unit's outputs in full as a rerun does (read from the page cache and hashed); and, the
   alternative the issue offered, reading every Parquet output with page-CRC verification (a
   decode of every page). A second ``rebalance`` of the finished run (nothing to do: every unit
   verified, report rewritten) is timed as a whole.

Figures of merit (``cost``): each check's seconds over the verified run's seconds. Writes
benchmarks/results/checksums.json (or --out) with the command and the load average.

    python benchmarks/bench_checksums.py --rows 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rebalance import COLUMNS, RECIPE, bare_scan, bench_corpus, corpus_options, load, provenance  # noqa: E402


def throughput(megabytes: int = 256, repeats: int = 3) -> dict[str, float]:
    """GB/s of each checksum over ``megabytes`` of random bytes, fed in 1 MiB pieces (best of repeats)."""
    import xxhash

    pieces = [os.urandom(1 << 20) for _ in range(megabytes)]  # the same 1 MiB bytes objects fed to each
    candidates = {"xxh3_64": lambda: xxhash.xxh3_64(), "xxh3_128": lambda: xxhash.xxh3_128()}
    try:
        import google_crc32c

        candidates["crc32c"] = google_crc32c.Checksum
    except ImportError:
        pass

    class Crc32:
        value = 0

        def update(self, b):
            self.value = zlib.crc32(b, self.value)

    candidates["zlib_crc32"] = Crc32
    out = {}
    for name, make in candidates.items():
        best = float("inf")
        for _ in range(repeats):
            h = make()
            t = time.perf_counter()
            for piece in pieces:
                h.update(piece)
            best = min(best, time.perf_counter() - t)
        out[name] = round((megabytes << 20) / best / 1e9, 2)
    return out


def decode_cpu(corpus: Path, repeats: int = 3) -> dict[str, float]:
    """CPU seconds to decode the mapped columns of every shard from memory, one thread, with and
    without page-CRC checks (best of ``repeats`` per shard, alternating): the work verify_checksums
    adds to the scan, measured where the machine's load barely moves it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    totals = {True: 0.0, False: 0.0}
    for path in sorted(corpus.glob("*.parquet")):
        data = path.read_bytes()
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeats):
            for verify in (False, True):
                t = time.process_time()
                pfile = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=verify)
                for _ in pfile.iter_batches(batch_size=16384, columns=COLUMNS, use_threads=False):
                    pass
                best[verify] = min(best[verify], time.process_time() - t)
        for verify in (True, False):
            totals[verify] += best[verify]
    return {"checked_cpu_seconds": round(totals[True], 3), "unchecked_cpu_seconds": round(totals[False], 3)}


def run(corpus: Path, out: Path, recipe: Path, executor: str, fresh: bool = True) -> dict:
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out), "--recipe", str(recipe),
           "--executor", executor, "-q"]
    before = load()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"rebalance failed: {proc.stderr}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": round(seconds, 3), "stage_seconds": report["stage_seconds"],
            "loadavg_1_5_15_before": before, "loadavg_1_5_15_after": load()}


def output_checks(out: Path, recipe_path: Path) -> dict:
    """The finished run's recorded outputs: their bytes, hashing them from memory, checking every
    unit in full as a rerun does, and reading the Parquet ones with page-CRC verification."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash

    from mmbalance.pipeline import stages
    from mmbalance.io.store import OUTPUTS_KEY, RunStore
    from mmbalance.io.recipes import load_recipe

    store = RunStore(str(out))
    recipe = load_recipe(recipe_path)
    units = {s.name: sorted(store.done_keys(s.name)) for s in stages.active_stages(recipe)}
    files = sorted({rel for name, keys in units.items() for key in keys
                    for rel in (store.read_marker(name, key) or {}).get(OUTPUTS_KEY, {})})
    total = sum((out / rel).stat().st_size for rel in files)
    blobs = [(out / rel).read_bytes() for rel in files]  # also warms the page cache
    t = time.perf_counter()
    for blob in blobs:
        view = memoryview(blob)
        h = xxhash.xxh3_64()
        for i in range(0, len(view), 1 << 16):  # a Parquet writer hands the sink pages, ~64 KiB to 1 MiB
            h.update(view[i:i + (1 << 16)])
    hash_seconds = time.perf_counter() - t
    del blobs
    t = time.perf_counter()
    checked = {name: store.check_units(name, keys) for name, keys in units.items()}
    verify_seconds = time.perf_counter() - t
    assert all(c.status == "done" for found in checked.values() for c in found.values()), "a unit is not verifiably done"
    parquet = [rel for rel in files if rel.endswith(".parquet")]
    t = time.perf_counter()
    for rel in parquet:
        with pa.OSFile(str(out / rel)) as handle:
            for _ in pq.ParquetFile(handle, page_checksum_verification=True).iter_batches(batch_size=65536, use_threads=False):
                pass
    page_crc_seconds = time.perf_counter() - t
    return {"files": len(files), "bytes": total, "units": sum(len(k) for k in units.values()),
            "hash_from_memory_seconds": round(hash_seconds, 3),
            "check_every_unit_seconds": round(verify_seconds, 3),
            "parquet_files": len(parquet),
            "read_parquet_with_page_crc_verification_seconds": round(page_crc_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    corpus_options(parser, "checksums.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = bench_corpus(args.work, args.rows, args.dim, args.rows_per_shard)
    recipes = {}
    for verify in (True, False):
        recipes[verify] = args.work / f"recipe-verify-{str(verify).lower()}.yaml"
        recipes[verify].write_text(RECIPE + f"execution: {{verify_checksums: {str(verify).lower()}}}\n")
    speeds = throughput()
    bare_scan(corpus, 16384)  # untimed: every figure after reads from the page cache
    decode = decode_cpu(corpus)
    out = args.work / f"out-checksums-{args.rows}"
    verified = run(corpus, out, recipes[True], args.executor)
    unverified = run(corpus, args.work / f"out-checksums-{args.rows}-unverified", recipes[False], args.executor)
    outputs = output_checks(out, recipes[True])
    rerun = run(corpus, out, recipes[True], args.executor, fresh=False)
    shutil.rmtree(args.work / f"out-checksums-{args.rows}-unverified", ignore_errors=True)
    seconds = verified["seconds"]
    scan_on, scan_off = verified["stage_seconds"]["scan"], unverified["stage_seconds"]["scan"]
    payload = {
        "benchmark": "checksums: whole-file xxh3-64 of run outputs (done markers) and input page CRCs (verify_checksums)",
        "definitions": {
            "throughput_gb_per_s": "each checksum over 256 MiB from memory in 1 MiB pieces, best of 3",
            "cost.write_time_hashing": "hashing every recorded output from memory / the verified run's seconds (the writers' added work)",
            "cost.check_every_unit": "reading and hashing every recorded output as a rerun or --plan does / the verified run's seconds",
            "cost.verify_checksums_on_input": "(scan stage seconds with verify_checksums on - off) / the verified run's seconds (two runs: noisy)",
            "cost.verify_checksums_decode_cpu": "(CPU seconds decoding every shard's mapped columns from memory with page-CRC checks - without; best of 3 per shard, one thread) / the verified run's seconds: what the check adds, robust to load",
            "cost.page_crc_alternative": "reading every Parquet output with page-CRC verification / the verified run's seconds",
            "rerun_of_finished_run": "a second rebalance of the finished run: every unit verified, report and html rewritten",
        },
        **provenance(args.note),
        "rows": args.rows, "shards": len(list(corpus.glob("*.parquet"))), "dim": args.dim, "executor": args.executor,
        "throughput_gb_per_s": speeds,
        "run_verified": verified,
        "run_unverified_input": unverified,
        "outputs": outputs,
        "decode_mapped_columns": decode,
        "rerun_of_finished_run": rerun,
        "cost": {
            "write_time_hashing": round(outputs["hash_from_memory_seconds"] / seconds, 5),
            "check_every_unit": round(outputs["check_every_unit_seconds"] / seconds, 5),
            "verify_checksums_on_input": round((scan_on - scan_off) / seconds, 5),
            "verify_checksums_decode_cpu": round((decode["checked_cpu_seconds"] - decode["unchecked_cpu_seconds"]) / seconds, 5),
            "page_crc_alternative": round(outputs["read_parquet_with_page_crc_verification_seconds"] / seconds, 5),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["cost"]), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
