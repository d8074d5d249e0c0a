"""Row validation cost per batch (issues 13, 25): the embedding checks (null, dimension, NaN/inf,
all zero; one call, as the scan makes it) for list<float32> and fixed_size_list<float16> columns,
and the majority-length dimension election over the first shard's rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_validate.py        # 16384 x 768, 20 repeats

Writes benchmarks/results/validate_<rows>x<dim>.json (median seconds, rows/s, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.operators.validate import embedding_problems  # noqa: E402
from mmbalance.pipeline.shards import DIM_SAMPLE_ROWS, InspectedShard, Shard, _first_lengths  # noqa: E402
from mmbalance.schemas.contract import ShardLayout  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows, dim = args.rows, args.dim
    rng = np.random.default_rng(0)
    m = rng.normal(size=(rows, dim)).astype(np.float32)
    m[::97] = 0  # some all-zero rows
    offsets = pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32))
    columns = {
        "list_float32": pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1))),
        "fixed_size_float16": pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1).astype(np.float16)), dim),
    }
    out: dict = {"rows": rows, "dim": dim, "repeats": args.repeats, "loadavg_before": os.getloadavg(), "columns": {}}
    for name, col in columns.items():
        seconds = median_seconds(lambda: embedding_problems(col, dim), args.repeats)
        assert embedding_problems(col, dim).all_zero.sum() == len(range(0, rows, 97))
        out["columns"][name] = {"embedding_checks_s": round(seconds, 5), "rows_per_s": round(rows / seconds)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.parquet")
        pq.write_table(pa.table({"e": columns["list_float32"]}), path, use_dictionary=False)
        shard = InspectedShard(Shard(0, "a.parquet", path, os.path.getsize(path), "a"), ShardLayout(["e"]), pq.read_schema(path))
        fs = pafs.LocalFileSystem()
        out["dimension_election_s"] = round(median_seconds(lambda: _first_lengths(fs, shard, "e", DIM_SAMPLE_ROWS, False), 5), 5)
    out["loadavg_after"] = os.getloadavg()
    out["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "pyarrow": pa.__version__}
    dest = Path(__file__).parent / "results" / f"validate_{rows}x{dim}.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
