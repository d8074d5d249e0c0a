"""What balancing the data does to the model, end to end (docs/model-bias.md).

Generates the rendered corpus (``mmbalance.synth_images``: pixels carry a gender cue on half the
persons, an occupation glyph and a latent scene), rebalances it with ``mmbalance rebalance``
(a) none, (b) cap, (c) M4 on the caption labels, (d) M4 with per-label parity and image-embedding
moments, exports the default webdataset, trains a tiny open_clip model from each export with
``open_clip_train`` on CPU (same samples seen, several seeds) and evaluates every checkpoint.
(e) runs R&B in the training loop (``OnlineMixer`` on the model's own final-layer gradients)
against the offline R&B mixture (``balance.method: rnb``) and uniform domain sampling, in one
small loop (benchmarks/model_bias_loop.py), with the mixer's overhead.

    python benchmarks/bench_model_bias.py --out /tmp/model-bias --json benchmarks/results/model_bias.json

Jobs run ``--jobs`` at a time (one thread each). ``--quick`` is a smoke run (minutes, figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from model_bias_report import (  # noqa: E402
    aggregate, check_against_numpy, check_markers, data_side, evaluate_figures, evaluate_recipe, markdown_table,
    paired_differences, paired_table, update_docs)

from mmbalance.synth_images import synth_image_corpus  # noqa: E402

# 2-layer, 64-wide towers (patch 8 on 32 px, 16-token text): ~3.4M parameters, mostly the token table
TINY_MODEL = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}
CONFIGS = ("none", "cap", "m4", "m4_parity")
ARMS = ("uniform", "offline", "online")
DOCS = (HERE.parent / "docs" / "model-bias.md", HERE.parent / "README.md")  # what --update-docs writes


@dataclass
class Settings:
    rows: int = 64_000
    shards: int = 4
    cue_rate: float = 0.5
    seeds: int = 3
    rnb_seeds: int = 2                # seeds of each R&B arm (e)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    jobs: int = 2
    device: str = "cpu"               # cuda: training and evaluation on the GPU
    cap: int = 6400
    retention: float = 0.9            # M4 asks for this, takes the largest feasible below it
    tol_representation: float = 0.005
    tol_association: float = 0.005
    tol_per_label: float = 0.02
    tol_embedding: float = 0.05
    round_steps: int = 100            # R&B round length (steps)
    lam: float = 3.0
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    arms: list[str] = field(default_factory=lambda: list(ARMS))


def parity_supported() -> bool:
    """(d) needs M4 per-label parity and embedding moments (the m4-parity branch)."""
    from mmbalance.schemas.balance import M4Tolerance

    return {"association_per_label", "association_embedding"} <= set(M4Tolerance.model_fields)


def recipe(config: str, s: Settings, embed_checkpoint: str | None, model_dir: Path) -> dict:
    base: dict = {
        "input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
        "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"},
                        "values": ["woman", "man"]}],
        "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
        # one-epoch training on a local disk: tars sized by the share bound alone (no request floor),
        # as in the published table
        "export": {"seed": 0, "formats": ["webdataset"], "domain": {"by": "occupation"},
                   "epoch_size": s.steps * s.batch_size, "webdataset": {"min_shard_size": 1}},
        "report": {"html": False},
    }
    m4 = {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
          "tolerance": {"representation": s.tol_representation, "association": s.tol_association},
          "retention": s.retention, "on_infeasible": "max_retention"}
    if config == "none":
        base["balance"] = {"method": "none"}
    elif config == "cap":
        base["balance"] = {"method": "cap", "by": "occupation", "cap": s.cap}
    elif config == "m4":
        base["balance"] = m4
    elif config == "m4_parity":
        base["balance"] = {**m4, "associate": [["gender", "occupation"], ["gender", "embedding.image"]],
                           "tolerance": {**m4["tolerance"], "association_per_label": s.tol_per_label,
                                         "association_embedding": s.tol_embedding}}
    elif config == "rnb":
        base["balance"] = {"method": "rnb", "by": "occupation", "lam": s.lam}
    else:
        raise ValueError(config)
    if embed_checkpoint is not None:  # embeddings from the control model (none, seed 0)
        base["embed"] = {"model": f"local-dir:{model_dir}", "pretrained": embed_checkpoint, "batch_size": 256}
    return base


@dataclass
class Job:
    name: str
    argv: object                      # list[str] or a callable returning it (built when the job starts)
    deps: list[str]
    log: Path
    seconds: float = 0.0
    cpu_seconds: float = 0.0          # user + system time of the job's process (what a quiet machine needs)
    command: str = ""


def run_jobs(jobs: list[Job], parallel: int, env: dict) -> None:
    """Run jobs (in list order, once their deps are done), ``parallel`` at a time; stop on a failure."""
    pending, running, done = list(jobs), {}, set()
    while pending or running:
        for job in [j for j in pending if all(d in done for d in j.deps)]:
            if len(running) >= parallel:
                break
            argv = job.argv() if callable(job.argv) else job.argv
            job.command = shlex.join(argv)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            log = open(job.log, "w")
            running[job.name] = (job, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), time.perf_counter(), log)
            pending.remove(job)
            print(f"[{time.strftime('%H:%M:%S')}] start {job.name}", flush=True)
        time.sleep(0.2)
        for name, (job, proc, t0, log) in list(running.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # the exit status and the child's CPU time
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.close()
            job.seconds = time.perf_counter() - t0
            job.cpu_seconds = usage.ru_utime + usage.ru_stime
            del running[name]
            if proc.returncode != 0:
                for _, p, _, _ in running.values():
                    p.terminate()
                tail = job.log.read_text()[-3000:]
                sys.exit(f"bench_model_bias: job {name} failed (exit {proc.returncode}); log {job.log}:\n{tail}")
            done.add(name)
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} ({job.seconds:.0f} s, {job.cpu_seconds:.0f} s CPU)", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work directory (corpus, runs, checkpoints)")
    ap.add_argument("--json", help="write the results here (e.g. benchmarks/results/model_bias.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2,000 rows, 40 steps, one seed")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the tables into docs/model-bias.md and README.md (between their model-bias-table markers)")
    for f in Settings.__dataclass_fields__.values():
        if f.name in ("configs", "arms"):
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    ap.add_argument("--configs", default=None, help=f"subset of {','.join(CONFIGS)} (default: all this checkout supports)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"R&B arms, subset of {','.join(ARMS)}; '' skips (e)")
    a = ap.parse_args(argv)
    s = Settings(**({"rows": 2000, "shards": 2, "seeds": 1, "rnb_seeds": 1, "steps": 40, "warmup": 5, "cap": 200, "round_steps": 10}
                    if a.quick else {}))
    for name in Settings.__dataclass_fields__:
        if name not in ("configs", "arms") and getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    s.configs = ([c for c in a.configs.split(",") if c] if a.configs is not None
                 else [c for c in CONFIGS if c != "m4_parity" or parity_supported()])
    s.arms = [c for c in a.arms.split(",") if c]
    bad = [c for c in s.configs if c not in CONFIGS] + [c for c in s.arms if c not in ARMS]
    if bad:
        sys.exit(f"bench_model_bias: unknown configuration(s) {bad}; configs are {CONFIGS}, arms {ARMS}")
    if "m4_parity" in s.configs and not parity_supported():
        print("bench_model_bias: error: configuration m4_parity (d) needs M4 per-label parity and embedding "
              "moments (tolerance.association_per_label, associate: [gender, embedding.image]), which this "
              "checkout lacks; merge the m4-parity branch or pass --configs none,cap,m4", file=sys.stderr)
        sys.exit(2)
    if a.update_docs:
        try:
            check_markers(*DOCS)
        except ValueError as exc:
            sys.exit(f"bench_model_bias: error: {exc}")
    run(Path(a.out).resolve(), s, a)


def run(out: Path, s: Settings, a) -> None:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps(TINY_MODEL, indent=1))
    corpus, eval_dir = out / "corpus", out / "eval"
    t0 = time.perf_counter()
    if not (corpus / "_synth.json").exists():
        synth_image_corpus(corpus, s.rows, s.shards, seed=0, cue_rate=s.cue_rate, eval_dir=eval_dir)
    planted = json.loads((corpus / "_synth.json").read_text())
    synth_seconds = time.perf_counter() - t0
    eval_path = eval_dir / "eval.parquet"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if s.device == "cpu" else {}),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    py = sys.executable
    mmb = [py, "-m", "mmbalance.cli"]
    control = out / "train" / "none-s0" / "checkpoints" / "epoch_1.pt"
    needs_embed = {"m4_parity", "rnb"}
    data_configs = list(s.configs) + (["rnb"] if "offline" in s.arms else [])
    if s.arms and "none" not in data_configs:
        data_configs.insert(0, "none")
    if any(c in needs_embed for c in data_configs) and "none" not in s.configs:
        s.configs.insert(0, "none")  # the control model embeds the corpus for (d) and R&B
    jobs: list[Job] = []

    def train_argv(config: str, seed: int):
        def build() -> list[str]:
            info = json.loads((out / "runs" / config / "export" / "webdataset" / "open_clip.json").read_text())
            return [py, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}", *info["open_clip_args"],
                    "--batch-size", str(s.batch_size), "--epochs", "1", "--lr", str(s.lr), "--warmup", str(s.warmup),
                    "--workers", "0", "--device", s.device, "--precision", "fp32", "--logs", str(out / "train"),
                    "--name", f"{config}-s{seed}", "--seed", str(seed), "--report-to", "", "--log-every-n-steps", "100"]
        return build

    for config in data_configs:
        ckpt = str(control) if config in needs_embed else None
        rpath = out / "recipes" / f"{config}.yaml"
        rpath.parent.mkdir(parents=True, exist_ok=True)
        rpath.write_text(yaml.safe_dump(recipe(config, s, ckpt, model_dir), sort_keys=False))
        jobs.append(Job(f"rebalance:{config}", [*mmb, "rebalance", str(corpus), "--out", str(out / "runs" / config),
                                                "--recipe", str(rpath), "--executor", "local", "--quiet"],
                        ["train:none-s0"] if ckpt else [], out / "logs" / f"rebalance-{config}.log"))
    checkpoints: dict[str, tuple[str, int, Path]] = {}
    for seed in range(max(s.seeds, s.rnb_seeds)):
        for config in s.configs if seed < s.seeds else ():
            name = f"{config}-s{seed}"
            jobs.append(Job(f"train:{name}", train_argv(config, seed), [f"rebalance:{config}"], out / "logs" / f"train-{name}.log"))
            checkpoints[name] = (config, seed, out / "train" / name / "checkpoints" / "epoch_1.pt")
        for arm in s.arms if seed < s.rnb_seeds else ():
            name = f"rnb_{arm}-s{seed}"
            argv = [py, str(HERE / "model_bias_loop.py"), "--export", str(out / "runs" / "none" / "export" / "webdataset"),
                    "--model-dir", str(model_dir), "--arm", arm, "--out", str(out / "loop" / name), "--steps", str(s.steps),
                    "--batch-size", str(s.batch_size), "--lr", str(s.lr), "--warmup", str(s.warmup),
                    "--round-steps", str(s.round_steps), "--lam", str(s.lam), "--seed", str(seed), "--device", s.device]
            if arm == "offline":
                argv += ["--mixture", str(out / "runs" / "rnb" / "export" / "mixture.json")]
            deps = ["rebalance:none"] + (["rebalance:rnb"] if arm == "offline" else [])
            jobs.append(Job(f"train:{name}", argv, deps, out / "logs" / f"train-{name}.log"))
            checkpoints[name] = (f"rnb_{arm}", seed, out / "loop" / name / "checkpoints" / "final.pt")
    for name, (_, _, ckpt) in checkpoints.items():
        erecipe = out / "eval-recipes" / f"{name}.yaml"
        erecipe.parent.mkdir(parents=True, exist_ok=True)
        erecipe.write_text(evaluate_recipe(model_dir, ckpt, eval_path, device=s.device))
        jobs.append(Job(f"eval:{name}", [*mmb, "evaluate", str(eval_path), "--recipe", str(erecipe), "--out",
                                         str(out / "eval" / name)], [f"train:{name}"], out / "logs" / f"eval-{name}.log"))
        # the numpy recomputation: from evaluate's stored embeddings, and from its own forward pass
        jobs.append(Job(f"check:{name}", [py, str(HERE / "model_bias_metrics.py"), "--model-dir", str(model_dir),
                                          "--checkpoint", str(ckpt), "--eval", str(eval_path), "--evaluate-dir",
                                          str(out / "eval" / name), "--out", str(out / "check" / name / "numpy.json")],
                        [f"eval:{name}"], out / "logs" / f"check-{name}.log"))
    run_jobs(jobs, s.jobs, env)

    runs = {}
    for name, (config, seed, _) in checkpoints.items():
        rdir = out / "eval" / name
        numpy_figures = json.loads((out / "check" / name / "numpy.json").read_text())
        figures = evaluate_figures(json.loads((rdir / "evaluate.json").read_text()))
        same_embeddings = numpy_figures.pop("from_evaluate_embeddings")
        entry = {"config": config, "seed": seed, "evaluate": figures, "numpy": numpy_figures,
                 # the same embeddings, independent metric code: equal up to float rounding
                 "numpy_from_evaluate_embeddings_max_diff": check_against_numpy(figures, same_embeddings),
                 # own forward pass (float64 vs evaluate's float16 storage): near-tied predictions may flip
                 "numpy_own_forward_max_diff": check_against_numpy(figures, numpy_figures),
                 "train_seconds": round(next(j.seconds for j in jobs if j.name == f"train:{name}"), 1)}
        loop = out / "loop" / name / "loop.json"
        if loop.exists():
            entry["loop"] = json.loads(loop.read_text())
        runs[name] = entry
    result = {
        "command": "python " + shlex.join(["benchmarks/bench_model_bias.py", *sys.argv[1:]]),
        "evaluator": "mmbalance evaluate; benchmarks/model_bias_metrics.py recomputes the figures in numpy beside it",
        "settings": asdict(s),
        "model": TINY_MODEL,
        "machine": machine(),
        "planted": {k: v for k, v in planted.items() if k != "eval"},
        "data": {c: data_side(out / "runs" / c, corpus) for c in data_configs},
        "recipes": {c: yaml.safe_load((out / "recipes" / f"{c}.yaml").read_text()) for c in data_configs},
        "train_commands": {j.name.removeprefix("train:"): j.command for j in jobs if j.name.startswith("train:")},
        "runs": runs,
        "table": aggregate(runs),
        "paired": paired_differences(runs),
        "cpu_seconds": {"jobs_total": round(sum(j.cpu_seconds for j in jobs), 1), "driver": round(_own_cpu(), 1),
                        **{j.name: round(j.cpu_seconds, 1) for j in jobs}},
        "seconds": {"synth": round(synth_seconds, 1),
                    **{j.name: round(j.seconds, 1) for j in jobs if not j.name.startswith(("check:", "eval:"))},
                    "evaluate_total": round(sum(j.seconds for j in jobs if j.name.startswith(("check:", "eval:"))), 1),
                    "total_wall": round(time.perf_counter() - t_start, 1)},
    }
    print(markdown_table(result))
    print()
    print(paired_table(result))
    print(f"total {result['seconds']['total_wall']:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=float) + "\n")
    if a.update_docs:
        update_docs(result, *DOCS)


def _own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # synth and the tables, in this process
    return usage.ru_utime + usage.ru_stime


def machine() -> dict:
    import platform

    import open_clip
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__}


if __name__ == "__main__":
    main()
