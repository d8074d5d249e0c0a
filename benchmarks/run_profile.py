"""Where a run's CPU goes: ``mmbalance rebalance`` under py-spy, every process of it (the driver, the
Ray workers, Ray's Python daemons), folded into the entries bench_rebalance.py records.

py-spy samples each process's threads that are not idle (a thread waiting in ``ray.wait`` or on a
lock is not counted), so the counts are CPU samples (a runnable thread waiting for a core on a
loaded machine counts too). ``--subprocesses`` follows the raylet's children, so a worker started
per stage shows up as another process: ``processes`` counts them by kind.

    python benchmarks/run_profile.py CORPUS RECIPE OUT --executor ray   # prints the summary as JSON
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RATE = 50  # samples per second and process


def _kind(process: str, frames: list[str]) -> str:
    """By the command line, else by the stack: py-spy sometimes reads a process's command line as ""
    (then every run's driver counted as a daemon, and its stages went unprofiled)."""
    if "mmbalance.cli" in process or any(f.startswith("<module> (mmbalance/cli.py") for f in frames):
        return "driver"
    if "default_worker" in process or "setup_worker" in process or any("ray/_private/workers/default_worker.py" in f for f in frames):
        return "ray worker"
    return "ray daemon"


def _stage_of(frames: list[str]) -> str:
    """The driver's stage a sample belongs to (its Stage.run / Runner frame), or what else it was."""
    for frame in frames:
        m = re.match(r"(\w+)\.run \(mmbalance/pipeline/stages/", frame)
        if m:  # a stage's own work (a per-unit stage's too, on the local executor)
            return m.group(1).lower()
    for frame in frames:
        if frame.startswith("Runner.run_units"):
            return "per-unit stage (driver side)"
        if frame.startswith("RayExecutor.release"):
            return "release workers"
        if frame.startswith("ray_session"):
            return "ray start/stop"
    return "startup, discovery, inspection"


def summarise(raw: Path, top: int = 20) -> dict:
    """py-spy's raw output (``process ...;frame;...;frame count`` lines) by process kind, by the
    driver's stage, the share spent importing modules, and the top functions of the driver and the
    workers: by own samples, and by inclusive samples among mmbalance's functions."""
    processes: collections.Counter = collections.Counter()
    importing: collections.Counter = collections.Counter()
    pids: dict[str, set] = collections.defaultdict(set)
    stages: collections.Counter = collections.Counter()
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples = []
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not line.startswith("process ") or not count.isdigit():
            continue  # a process whose command line spans lines (python -c with a script)
        parts = stack.split(";")
        last = max(i for i, p in enumerate(parts) if p.startswith("process "))
        # a function's samples together, whichever of its lines they were on
        samples.append((parts[last], [re.sub(r":\d+\)$", ")", f) for f in parts[last + 1:]], int(count)))
    kind_of: dict[str, str] = {}  # pid -> kind, from any of its threads' stacks (a helper thread's tells nothing)
    for process, frames, _ in samples:
        pid, kind = process.split(":")[0], _kind(process, frames)
        if kind != "ray daemon" or pid not in kind_of:
            kind_of[pid] = kind
    for process, frames, n in samples:
        kind = kind_of[process.split(":")[0]]
        processes[kind] += n
        pids[kind].add(process.split(":")[0])
        if kind == "driver":
            stages[_stage_of(frames)] += n
        if any(f.startswith("_find_and_load ") for f in frames):
            importing[kind] += n
        if frames and kind != "ray daemon":
            own[kind][frames[-1]] += n
            for frame in set(frames):
                if "(mmbalance/" in frame:
                    inclusive[kind][frame] += n

    def entries(counter: collections.Counter) -> list[dict]:
        return [{"function": f, "samples": n, "cpu_s": round(n / RATE, 2)} for f, n in counter.most_common(top)]

    return {
        "sampler": f"py-spy record --subprocesses -r {RATE} (non-idle threads)",
        "cpu_s_by_process_kind": {k: round(n / RATE, 2) for k, n in processes.most_common()},
        "processes_by_kind": {k: len(v) for k, v in pids.items()},
        "importing_cpu_s_by_process_kind": {k: round(n / RATE, 2) for k, n in importing.most_common()},
        "driver_cpu_s_by_stage": {k: round(n / RATE, 2) for k, n in stages.most_common()},
        "top_self": {k: entries(c) for k, c in own.items()},
        "top_inclusive_mmbalance": {k: entries(c) for k, c in inclusive.items()},
    }


def scan_units(corpus: Path, recipe: Path, out: str, count: int):
    """(the scan stage, a run context writing under ``out``, the first ``count`` shards' scan tasks)
    for running scan units in this process as a worker runs them; the recipe's mapped columns, the
    corpus's embedding dimensions. Also runs against an older tree's package (PYTHONPATH)."""
    import dataclasses

    import pyarrow.parquet as pq

    from mmbalance.io.recipes import load_recipe
    from mmbalance.pipeline.shards import discover_shards
    from mmbalance.pipeline.stage import RunContext
    from mmbalance.pipeline.stages import STAGES
    from mmbalance.pipeline.stages.scan import ScanTask

    try:
        from mmbalance.pipeline.sampling import sample_threshold
    except ImportError:  # a tree from before ec3625e
        from mmbalance.pipeline.fit import sample_threshold
    spec = load_recipe(recipe)
    _, found = discover_shards(str(corpus))
    found = [dataclasses.replace(s, num_rows=pq.ParquetFile(corpus / s.relpath).metadata.num_rows) for s in found]
    columns = tuple(c for c in spec.input.columns.model_dump().values() if isinstance(c, str))
    columns += tuple(a.source_column for a in [*spec.attributes, *spec.labels] if "column" in a.sources)
    dims = tuple((c, pq.ParquetFile(corpus / found[0].relpath).schema_arrow.field(c).type.list_size)
                 for c in (spec.input.columns.image_embedding, spec.input.columns.text_embedding) if c)
    scan = next(s for s in STAGES if s.name == "scan")
    ctx = RunContext(str(corpus), out, spec, tuple(dict.fromkeys(columns)), dims, sample_threshold(spec, sum(s.num_rows for s in found)))
    return scan, ctx, [ScanTask(shard=s, rows=s.num_rows, sample_threshold=ctx.sample_threshold) for s in found[:count]]


def scan_cpu_profile(corpus: Path, recipe: Path, shards: int = 4, top: int = 20) -> dict:
    """The scan's own work by CPU time (cProfile with a CPU clock, so other jobs' load does not move
    the shares, unlike sampled wall time): ``shards`` scan units in this process, after one untimed
    unit (imports, caches), beside a plain read of the same shards' mapped columns."""
    import cProfile
    import pstats
    import time

    import pyarrow.parquet as pq

    from mmbalance.pipeline.stage import run_unit

    with tempfile.TemporaryDirectory() as out:
        scan, ctx, tasks = scan_units(corpus, recipe, out, shards + 1)
        run_unit(scan, ctx, False, tasks[0])
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        for task in tasks[1:]:
            run_unit(scan, ctx, False, task)
        profile.disable()
    started = time.process_time()
    for task in tasks[1:]:
        for _ in pq.ParquetFile(corpus / task.shard.relpath).iter_batches(ctx.recipe.execution.batch_rows, columns=list(ctx.source_columns)):
            pass
    read_cpu = time.process_time() - started
    stats = pstats.Stats(profile)
    total = sum(tt for _, _, tt, _, _ in stats.stats.values())
    rows = [(ct, f"{name} ({Path(file).name}:{line})") for (file, line, name), (_, _, _, ct, _) in stats.stats.items()]
    return {"rows": sum(t.rows for t in tasks[1:]), "scan_cpu_s": round(total, 3), "read_cpu_s_same_rows": round(read_cpu, 3),
            "top_cumulative": [{"function": f, "cpu_s": round(ct, 3), "share": round(ct / total, 3)}
                               for ct, f in sorted(rows, reverse=True)[:top]]}


def profile_run(corpus: Path, recipe: Path, out: Path, executor: str, top: int = 20) -> dict:
    """One rebalance run under py-spy (not the timed one: sampling costs CPU)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = [spy, "record", "--subprocesses", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--",
               sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(out),
               "--recipe", str(recipe), "--executor", executor, "-q"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not raw.exists():
            raise SystemExit(f"profiled rebalance failed: {done.stderr[-2000:]}")
        summary = summarise(raw, top)
    report = json.loads((out / "report.json").read_text())
    return {"executor": executor, "stage_seconds_under_profiler": report["stage_seconds"], **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--executor", default="ray")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(profile_run(args.corpus, args.recipe, args.out, args.executor, args.top), indent=2))


if __name__ == "__main__":
    main()
