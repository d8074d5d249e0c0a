"""``mmbalance evaluate`` against the embed stage on the same images (issue 20's acceptance: the
evaluation runs at >= 0.9 of the embed stage's throughput: it is the same forward pass plus a few
matrix products).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_evaluate.py --images 10000 --model ViT-B-32 --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_evaluate.py --images 400 --model tiny   # a quick check

Generates an evaluation set once (JPEG bytes cycled from a pool of distinct photo-like images,
captions, a perceived-gender column null on about half the rows, 8 occupations) and then, in fresh
processes, alternating, ``--repeats`` times each:
  embed     the embed stage: ``pipeline.stages.embed_shard_stage`` over every row of every shard, the
            function ``mmbalance rebalance`` runs, model load included (images/s, wall clock);
  evaluate  ``mmbalance evaluate`` in-process (``pipeline.evaluate.evaluate``, executor local): scan,
            model load, the same embed stage, prompts, every figure with 1000 bootstrap resamples,
            evaluate.json and evaluate.html (images/s, wall clock).
The ratio is evaluate images/s over embed images/s (medians). Random-init weights: speed does not
depend on them. Writes JSON into benchmarks/results/ with the command that produced it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OCCUPATIONS = ["nurse", "welder", "chef", "pilot", "teacher", "farmer", "lawyer", "plumber"]


def model_fields(args, workdir: Path) -> dict:
    if args.model == "tiny":
        from bench_embed import TINY

        d = workdir / "tiny"
        d.mkdir(exist_ok=True)
        (d / "open_clip_config.json").write_text(json.dumps(TINY))
        name = f"local-dir:{d}"
    else:
        name = args.model
    return {"name": name, "pretrained": "random", "batch_size": args.batch_size, "num_cpus": args.threads,
            "precision": args.precision, "device": args.device, "num_gpus": args.num_gpus}


def write_set(args, workdir: Path) -> Path:
    from bench_embed import captions, jpeg_pool

    path = workdir / "set"
    marker = path / f"_ready-{args.images}-{args.long_side}"
    if marker.exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    pool = jpeg_pool(args.pool, args.long_side, seed=0)
    rng = np.random.default_rng(0)
    per_shard = -(-args.images // args.shards)
    for s in range(args.shards):
        lo, hi = s * per_shard, min(args.images, (s + 1) * per_shard)
        n = hi - lo
        gender = [None if rng.random() < 0.5 else ("woman" if rng.random() < 0.5 else "man") for _ in range(n)]
        pq.write_table(pa.table({
            "uid": [f"u{i}" for i in range(lo, hi)],
            "image": pa.array([pool[i % len(pool)] for i in range(lo, hi)], pa.binary()),
            "caption": captions(n, seed=s),
            "gender": pa.array(gender, pa.string()),
            "occupation": [OCCUPATIONS[i] for i in rng.integers(0, len(OCCUPATIONS), n)],
        }), path / f"part-{s:03d}.parquet", row_group_size=1024)
    marker.write_text("")
    return path


def recipe(args, workdir: Path) -> dict:
    return {
        "model": model_fields(args, workdir),
        "eval": {"columns": {"uid": "uid", "image": "image", "caption": "caption"}},
        "attributes": [{"name": "gender", "vocabulary": "perceived_gender"}],
        "labels": [{"name": "occupation", "prompts": ["a photo of a {occupation}.", "a {label} at work."]}],
        "bootstrap": {"samples": args.samples},
        "execution": {"executor": "local"},
    }


def run_embed(args, workdir: Path) -> dict:
    """The embed stage alone, as a rebalance runs it (LocalExecutor over the shards, every row valid)."""
    from mmbalance.pipeline import stages
    from mmbalance.pipeline.executor import LocalExecutor
    from mmbalance.pipeline.shards import discover_shards
    from mmbalance.pipeline.store import RunStore
    from mmbalance.schemas.evaluate import parse_eval_recipe
    from mmbalance.schemas.recipe import InputSpec, Recipe

    spec = parse_eval_recipe(recipe(args, workdir)).model.embed_spec()
    source = workdir / "set"
    out = workdir / "embed-run"
    shutil.rmtree(out, ignore_errors=True)
    store = RunStore(str(out))
    _, shards = discover_shards(str(source))
    corpus = Recipe(input=InputSpec(columns={"uid": "uid", "image": "image", "caption": "caption"}), embed=spec)
    rows = 0
    for s in shards:  # what the scan stage leaves behind: every row valid
        n = pq.ParquetFile(s.path).metadata.num_rows
        rows += n
        store.write_table("tags", f"{s.shard_id}.parquet", table=pa.table({"row": pa.array(np.arange(n), pa.int64())}))
    ctx = stages.RunContext(str(source), str(out), corpus, (), ())
    t0 = time.perf_counter()
    info = stages._embed_bundle(spec.model_dump_json()).info  # the model load, as the stage's first unit pays it
    info = {k: v for k, v in info.items() if k not in ("precision", "device", "image_decode")}
    tasks = [{"shard_id": s.shard_id, "relpath": s.relpath, "path": s.path, "embed_info": info} for s in shards]
    done = list(LocalExecutor().map(functools.partial(stages.embed_shard_stage, ctx), tasks))
    wall = time.perf_counter() - t0
    assert sum(d["rows_out"] for d in done) == rows
    return {"role": "embed", "images": rows, "seconds": round(wall, 3), "images_per_s": round(rows / wall, 2)}


def run_evaluate(args, workdir: Path) -> dict:
    from mmbalance.pipeline.evaluate import EvaluateOptions, evaluate
    from mmbalance.schemas.evaluate import parse_eval_recipe

    out = workdir / "eval-run"
    shutil.rmtree(out, ignore_errors=True)
    spec = parse_eval_recipe(recipe(args, workdir))
    t0 = time.perf_counter()
    doc = evaluate(str(workdir / "set"), str(out), spec, EvaluateOptions(executor="local"))
    wall = time.perf_counter() - t0
    steps = json.loads((out / "stats.json").read_text())["seconds"]
    return {"role": "evaluate", "images": doc["eval"]["images"], "seconds": round(wall, 3),
            "images_per_s": round(doc["eval"]["images"] / wall, 2), "steps": steps}


def machine(args) -> dict:
    import open_clip
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "torch_threads": args.threads,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}  # a shared machine: read figures with it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init) or 'tiny'")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--pool", type=int, default=256, help="distinct JPEGs, cycled")
    ap.add_argument("--long-side", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch threads (model.num_cpus)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples of the evaluation")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mmbalance-bench-evaluate"))
    ap.add_argument("--role", choices=["embed", "evaluate"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/evaluate_<model>_<images>.json)")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.role:  # a fresh process per measurement: no model or page cache carried from the other role
        import open_clip  # noqa: F401 - imported before the clock in both roles: not part of a throughput
        import torch  # noqa: F401

        print(json.dumps((run_embed if args.role == "embed" else run_evaluate)(args, workdir)), flush=True)
        return
    write_set(args, workdir)
    runs = []
    for _ in range(args.repeats):
        for role in ("embed", "evaluate"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--role", role]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    median = {r: float(np.median([x["images_per_s"] for x in runs if x["role"] == r])) for r in ("embed", "evaluate")}
    result = {
        "benchmark": "mmbalance evaluate vs the embed stage on the same images (random-init weights)",
        "command": "OMP_NUM_THREADS=%s .venv/bin/python benchmarks/bench_evaluate.py %s" % (
            os.environ.get("OMP_NUM_THREADS", ""), " ".join(sys.argv[1:])),
        "machine": machine(args),
        "inputs": {"images": args.images, "shards": args.shards, "jpeg_long_side": args.long_side, "jpeg_pool": args.pool,
                   "model": args.model, "batch_size": args.batch_size, "bootstrap_samples": args.samples},
        "runs": runs,
        "median_images_per_s": median,
        "ratio_evaluate_to_embed": round(median["evaluate"] / median["embed"], 4),
        "acceptance": ">= 0.9",
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"evaluate_{args.model.replace('/', '_')}_{args.images}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio evaluate/embed = {result['ratio_evaluate_to_embed']} -> {out}")


if __name__ == "__main__":
    main()
