"""The scan's read of a source shard, as for an object store and as for a local file: Arrow's peak
memory and CPU.

pyarrow's defaults (``pre_buffer=True``, ``buffer_size=0``: the mode ``mmbalance.io.source`` keeps
for object stores) fetch a row group's column chunks whole and coalesced before decoding; a local
shard is read through a 1 MiB buffer as its pages are decoded (``open_source(local=True)``). The scan
reads 4,096-row batches out of row groups of 16,384 rows, so the whole-chunk read holds ~4x a batch's
embeddings. Each setting runs
in a fresh process (Arrow's peak is per process) over the same shards of the benchmark corpus
(bench_rebalance.py's: 512-d fp16 embeddings, 25k rows a shard), read through
``mmbalance.io.source.source_batches`` as the scan reads them, alternating, ``--repeat`` times;
medians. Writes benchmarks/results/read_buffer.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_read_buffer.py --shards 8 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rebalance import COLUMNS, bench_corpus, corpus_options, load, provenance  # noqa: E402

ONE_READ = r"""
import json, resource, sys, time
import pyarrow as pa
import pyarrow.fs as pafs
from mmbalance.io.source import open_source, source_batches
files, local, batch_rows, columns = json.loads(sys.argv[1])
rows, cpu = 0, time.process_time()
for path in files:
    with pafs.LocalFileSystem().open_input_file(path) as handle:  # as the scan opens a shard
        for table in source_batches(open_source(handle, path, local=local), path, columns, batch_rows):
            rows += table.num_rows
print(json.dumps({"rows": rows, "cpu_s": time.process_time() - cpu, "arrow_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000, help="the benchmark corpus to read from")
    parser.add_argument("--shards", type=int, default=8, help="shards read per measurement")
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    corpus_options(parser, "read_buffer.json")
    args = parser.parse_args()
    corpus = bench_corpus(args.work, args.rows, args.dim, args.rows_per_shard)
    files = [str(p) for p in sorted(corpus.glob("*.parquet"))[: args.shards]]
    subprocess.run([sys.executable, "-c", ONE_READ, json.dumps([files, False, args.batch_rows, COLUMNS])], check=True,
                   capture_output=True)  # warm the page cache
    modes = {"object store (pre_buffer, whole chunks)": False, "local (1 MiB buffer)": True}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    load_before = load()
    for _ in range(args.repeat):
        for mode, local in modes.items():
            out = subprocess.run([sys.executable, "-c", ONE_READ, json.dumps([files, local, args.batch_rows, COLUMNS])],
                                 check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out))
    results = [{"read": b, "rows": rs[0]["rows"],
                **{k: round(statistics.median(r[k] for r in rs), 3) for k in ("cpu_s", "arrow_peak_mb", "peak_rss_mb")},
                "cpu_s_each": [round(r["cpu_s"], 3) for r in rs]} for b, rs in runs.items()]
    report = {"benchmark": "read_buffer", **provenance(args.note), "batch_rows": args.batch_rows, "files": len(files),
              "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": load(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['read']}: cpu {r['cpu_s']:.2f} s, Arrow peak {r['arrow_peak_mb']:.0f} MB, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['rows']} rows)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
