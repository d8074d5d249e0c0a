"""The scan's CPU work per shard in instructions (valgrind's callgrind), against a plain read of the
same columns: a figure other jobs' load does not move, where wall and CPU seconds on a shared 2-core
box vary by 10-20% between identical runs (issue 25).

Each side runs in its own process under callgrind, once with one shard and once with three shards of
bench_rebalance.py's corpus (its recipe); the difference over two shards is the per-shard cost with
the process start, the imports and the first shard's warm-up taken out. Sides: the scan of this
tree, the scan of ``--base-source`` trees (``git archive REV | tar -x -C DIR``) and a plain read
(``ParquetFile.iter_batches`` of the mapped columns, 4,096-row batches), without and with the page
CRC check the scan makes by default. Two processes at a time; ~8 minutes for four sides here.

    python benchmarks/bench_scan_instructions.py --corpus /tmp/bench/corpus-4000000-512-25000 \
        --base-source /tmp/base

Writes benchmarks/results/scan_instructions.json (instructions per shard and per row, and each
scan's ratio to the read). Instructions are not seconds: the scan's numpy passes over decoded
embeddings miss cache more than the decode does, so its CPU-seconds ratio is higher (see
docs/scaling.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rebalance import RECIPE  # noqa: E402
from run_profile import scan_units  # noqa: E402


def child(mode: str, shards: int, corpus: Path, recipe: Path) -> None:
    """The measured process: ``shards`` scan units of the corpus (or plain reads of their columns)."""
    import pyarrow.parquet as pq

    from mmbalance.pipeline.stage import run_unit

    with tempfile.TemporaryDirectory() as out:
        scan, ctx, tasks = scan_units(corpus, recipe, out, shards)
        for task in tasks:
            if mode == "scan":
                run_unit(scan, ctx, False, task)
            else:  # "read", or "read-crc": checking page CRCs as the scan does (execution.verify_checksums)
                pfile = pq.ParquetFile(corpus / task.shard.relpath, page_checksum_verification=mode == "read-crc")
                for _ in pfile.iter_batches(ctx.recipe.execution.batch_rows, columns=list(ctx.source_columns)):
                    pass


def instructions(mode: str, shards: int, source: Path, corpus: Path, recipe: Path, work: Path) -> int:
    """Instructions callgrind counted for one child process."""
    tag = f"{mode}-{shards}-{abs(hash(str(source)))}"
    out = work / f"{tag}.callgrind"
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, str(Path(__file__).resolve()),
           "--child", mode, str(shards), "--corpus", str(corpus), "--recipe", str(recipe)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise SystemExit(f"{tag}: exit {done.returncode}: {done.stderr[-1500:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/mmbalance-bench/corpus-4000000-512-25000"))
    parser.add_argument("--recipe", type=Path, default=None, help="default: bench_rebalance.py's recipe")
    parser.add_argument("--base-source", type=Path, action="append", default=[], help="another tree's scan too (repeatable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan_instructions.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = args.recipe
        if recipe is None:
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(RECIPE)
        if args.child:
            child(args.child[0], int(args.child[1]), args.corpus, recipe)
            return
        if not shutil.which("valgrind"):
            raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
        sides = [("scan, this tree", "scan", ROOT)] + [(f"scan, {b}", "scan", b.resolve()) for b in args.base_source]
        sides += [("plain read", "read", ROOT), ("plain read, page CRCs checked", "read-crc", ROOT)]
        jobs = {(label, n): (mode, n, source) for label, mode, source in sides for n in (1, 3)}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            counts = dict(zip(jobs, pool.map(lambda job: instructions(*job, args.corpus, recipe, Path(tmp)), jobs.values())))
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(sorted(args.corpus.glob("*.parquet"))[1]).metadata.num_rows
    per_shard = {label: (counts[(label, 3)] - counts[(label, 1)]) / 2 for label, _, _ in sides}
    read = per_shard["plain read"]
    result = {
        "benchmark": "scan instructions per shard (callgrind), against a plain read of the same columns",
        "command": " ".join(["python", *sys.argv]),
        "corpus": str(args.corpus), "rows_per_shard": rows,
        "method": "per-shard = (count with 3 shards - count with 1 shard) / 2, each in a fresh process under callgrind",
        "sides": {label: {"instructions_per_shard": round(n), "instructions_per_row": round(n / rows),
                          "over_plain_read": round(n / read, 3),
                          "raw": {"1 shard": counts[(label, 1)], "3 shards": counts[(label, 3)]}}
                  for label, n in per_shard.items()},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["sides"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
