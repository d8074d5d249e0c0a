"""The GPU figures of issue 16, measured in one run (``benchmarks/gpu_check.sh`` installs and calls this).

    python benchmarks/gpu_check.py                 # CUDA: full size -> benchmarks/results/gpu_check_cuda.json
    python benchmarks/gpu_check.py --small         # any machine, small sizes -> ..._cpu_check.json without CUDA

Sections (each timed after warm-up, each recorded even when another fails):
  embed      ViT-B-32 (random init: speed does not depend on the weights), JPEG bytes:
             decode       JPEG bytes -> resized uint8 batch on the model's device (image_decode torch:
                          nvJPEG + tensor resize on CUDA), and PIL's decode + resize on the decode threads
             model_only   uint8 batches already on the device -> unit fp16 embeddings (fp16 weights, and
                          fp32 weights under fp16 autocast)
             end_to_end   ``embed_table`` on a table of JPEG bytes (prefetch thread, decode threads, model)
  faiss      spherical k-means of N x D to k (10 iterations, on all points) and nearest-centroid
             assignment rows/s, on the GPU when faiss has GPU support and sees one
  rebalance  ``mmbalance rebalance`` (the CLI, a subprocess) with ``embed:`` on a generated corpus of
             JPEGs: rows/s of the whole run and of its embed stage
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FULL = {"jpeg_pool": 256, "long_side": 512, "batch_size": 256, "decode_images": 8192, "model_batches": 40,
        "e2e_images": 16384, "faiss_n": 1_000_000, "faiss_d": 512, "faiss_k": 1000,
        "rebalance_rows": 16384, "rebalance_shards": 8}
SMALL = {"jpeg_pool": 8, "long_side": 256, "batch_size": 16, "decode_images": 32, "model_batches": 2,
         "e2e_images": 32, "faiss_n": 20_000, "faiss_d": 64, "faiss_k": 50,
         "rebalance_rows": 48, "rebalance_shards": 2}
FAISS_ITERATIONS = 10


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def timed(fn, repeat: int = 1) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return time.perf_counter() - t0


def model_name(name: str) -> str:
    """An open_clip name, or 'tiny': bench_embed's 2-layer config (small runs: CI's CPUs)."""
    if name != "tiny":
        return name
    from bench_embed import TINY

    directory = Path(tempfile.gettempdir()) / f"mmbalance-gpu-check-tiny-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(TINY))
    return f"local-dir:{directory}"


def embed_spec(model: str, device: str, precision: str, batch_size: int, threads: int, **kw):
    from mmbalance.schemas.embed import EmbedSpec

    gpu = {"num_gpus": 1.0, "device": "cuda"} if device == "cuda" else {"device": "cpu"}
    return EmbedSpec(model=model, pretrained="random", precision=precision, batch_size=batch_size,
                     num_cpus=threads, decode_threads=threads, **gpu, **kw)


def section_embed(args, sizes: dict, device: str) -> dict:
    from bench_embed import jpeg_pool

    from mmbalance.io.images import ImageSource
    from mmbalance.operators.embed.gpu_decode import prepare_tensors
    from mmbalance.operators.embed.images import decode_one
    from mmbalance.operators.embed.model import load_model
    from mmbalance.operators.embed.stage import EmbedColumns, embed_table

    bs = sizes["batch_size"]
    pool = jpeg_pool(sizes["jpeg_pool"], sizes["long_side"])
    out: dict = {"model": args.model, "batch_size": bs, "jpeg_long_side": sizes["long_side"],
                 "mean_jpeg_bytes": int(np.mean([len(b) for b in pool])), "decode_threads": args.threads}
    t0 = time.perf_counter()
    bundle = load_model(embed_spec(args.model, device, "fp16", bs, args.threads, image_decode="torch"))
    out["load_seconds"] = round(time.perf_counter() - t0, 2)
    out["device"], out["precision"] = bundle.device, bundle.info["precision"]

    # decode: JPEG bytes -> model-size uint8 batch on the device
    items = [(pool[i % len(pool)], None) for i in range(sizes["decode_images"])]
    batches = [items[i : i + bs] for i in range(0, len(items), bs)]
    source = ImageSource()

    def tensor_decode():
        for b in batches:
            ok, _, pixels, _ = prepare_tensors(bundle, source, b, "image", {"decode": 0.0})
            assert ok.all() and pixels.shape[0] == len(b)

    tensor_decode()  # warm: nvJPEG handles, allocator
    seconds = timed(tensor_decode)
    out["decode"] = {"tensor_path_images_per_s": rate(len(items), seconds), "images": len(items),
                     "path": "nvJPEG + tensor resize on CUDA" if bundle.device == "cuda" else "libjpeg-turbo + tensor resize on CPU"}
    pil_items = items[: max(bs, len(items) // 4)]
    seconds = timed(lambda: list(bundle.pool("decode").map(lambda it: decode_one(bundle, source, it, "image"), pil_items)))
    out["decode"]["pil_path_images_per_s"] = rate(len(pil_items), seconds)

    # model only: uint8 batches already on the device
    import torch

    pixels = torch.randint(0, 256, (bs, 3, *bundle.preprocessor.size), dtype=torch.uint8, device=bundle.device)
    model_only = {}
    for precision in ("fp16", "amp"):
        b = bundle if precision == "fp16" else load_model(embed_spec(args.model, device, "amp", bs, args.threads))
        for _ in range(3):
            b.encode_images(pixels)
        seconds = timed(lambda: b.encode_images(pixels), repeat=sizes["model_batches"])
        model_only[f"{precision}_images_per_s"] = rate(bs * sizes["model_batches"], seconds)
        if b is not bundle:
            b.close()
    out["model_only"] = model_only

    # end to end: a table of JPEG bytes through embed_table (images only, then images + captions)
    from bench_embed import captions

    n = sizes["e2e_images"]
    table = pa.table({"uid": [f"u{i}" for i in range(n)],
                      "image": pa.array([pool[i % len(pool)] for i in range(n)], pa.binary()),
                      "caption": captions(n, seed=2)})
    e2e = {"images": n}
    for name, cols in (("images_only", EmbedColumns("uid", "image", None)), ("images_and_captions", EmbedColumns("uid", "image", "caption"))):
        embed_table(table.slice(0, min(n, 2 * bs)), bundle, cols)  # warm
        timings: dict = {}
        sync()
        t0 = time.perf_counter()
        sidecar, rejects = embed_table(table, bundle, cols, timings=timings)
        sync()
        wall = time.perf_counter() - t0
        assert sidecar.num_rows == n and rejects.num_rows == 0
        e2e[name] = {"images_per_s": rate(n, wall), "seconds": round(wall, 3),
                     "thread_seconds": {k: round(v, 3) for k, v in timings.items() if k not in ("images", "captions")}}
    out["end_to_end"] = e2e
    bundle.close()
    return out


def section_faiss(sizes: dict, device: str) -> dict:
    import faiss

    from mmbalance import faiss_build

    report = faiss_build.describe()
    on_gpu = bool(report.get("gpu_build")) and report.get("num_gpus", 0) > 0
    out: dict = {"faiss": {k: report.get(k) for k in ("distributions", "version", "gpu_build", "num_gpus")}}
    if device == "cuda" and not on_gpu:
        out["skipped"] = (f"faiss has no GPU here ({', '.join(report['distributions']) or 'none'}, "
                          f"gpu_build={report.get('gpu_build')}): no faiss-gpu figure; python -m mmbalance.faiss_build --use gpu")
        return out
    n, d, k = sizes["faiss_n"], sizes["faiss_d"], sizes["faiss_k"]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    x = centres[rng.integers(0, k, n)] + rng.standard_normal((n, d), dtype=np.float32)
    faiss.normalize_L2(x)
    km = faiss.Kmeans(d, k, niter=FAISS_ITERATIONS, seed=1, spherical=True, gpu=on_gpu, verbose=False,
                      max_points_per_centroid=(n + k - 1) // k)  # train on all points, not faiss's 256/centroid sample
    t0 = time.perf_counter()
    km.train(x)
    fit = time.perf_counter() - t0
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    block = 65536
    index.search(x[:block], 1)  # warm
    t0 = time.perf_counter()
    for s in range(0, n, block):
        index.search(x[s : s + block], 1)
    assign = time.perf_counter() - t0
    out.update({"on_gpu": on_gpu, "n": n, "d": d, "k": k, "iterations": FAISS_ITERATIONS, "points_trained": n,
                "fit_seconds": round(fit, 3), "assign_block_rows": block, "assign_seconds": round(assign, 3),
                "assign_rows_per_s": rate(n, assign), "objective": float(km.obj[-1]) if len(km.obj) else None})
    return out


def jpeg_corpus(directory: Path, rows: int, shards: int, sizes: dict) -> Path:
    """synth's corpus (captions, occupation, gender) with its PNGs replaced by photo-like JPEGs."""
    from bench_embed import jpeg_pool

    from mmbalance.synth import synth_corpus

    synth_corpus(directory / "src", rows=rows, shards=shards, seed=3, dim=8, images=False)
    pool = jpeg_pool(sizes["jpeg_pool"], sizes["long_side"], seed=5)
    corpus = directory / "corpus"
    corpus.mkdir(parents=True)
    done = 0
    for path in sorted((directory / "src").glob("*.parquet")):
        t = pq.read_table(path).drop_columns(["image_emb", "text_emb"])
        t = t.append_column("image", pa.array([pool[(done + i) % len(pool)] for i in range(t.num_rows)], pa.binary()))
        done += t.num_rows
        pq.write_table(t, corpus / path.name)
    shutil.rmtree(directory / "src")
    return corpus


def section_rebalance(args, sizes: dict, device: str) -> dict:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        corpus = jpeg_corpus(work, sizes["rebalance_rows"], sizes["rebalance_shards"], sizes)
        executor = args.executor
        if executor == "auto":
            try:
                import ray  # noqa: F401

                executor = "ray" if not getattr(ray, "MMBALANCE_STUB", False) else "local"
            except ImportError:
                executor = "local"
        gpu = {"num_gpus": 1, "device": "cuda", "precision": "fp16"} if device == "cuda" else {"device": "cpu"}
        recipe = {
            "input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
            "embed": {"model": args.model, "pretrained": "random", "batch_size": sizes["batch_size"],
                      "num_cpus": max(1, args.threads // 2) if executor == "ray" else args.threads,
                      "decode_threads": args.threads, **gpu},
            "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
            "labels": [{"name": "occupation", "source": "column", "column": "occupation"}],
            "clusters": [{"name": "concept", "k": max(2, min(64, sizes["rebalance_rows"] // 16)), "embedding": "image"}],
            "sample": {"size": min(sizes["rebalance_rows"], 20000)},
            "balance": {"method": "waterfill", "by": "concept", "retention": 0.7},
            "report": {"html": False},
            "execution": {"executor": executor},
        }
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        cmd = [sys.executable, "-c", "from mmbalance.cli import main; main()", "rebalance", str(corpus),
               "--out", str(work / "run"), "--recipe", str(work / "recipe.yaml"), "--quiet", "--executor", executor]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.rebalance_timeout)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"mmbalance rebalance exited {done.returncode}: {(done.stderr or done.stdout).strip()[-2000:]}")
        out: dict = {"rows": sizes["rebalance_rows"], "shards": sizes["rebalance_shards"], "executor": executor,
                     "wall_seconds": round(wall, 2), "rows_per_s": rate(sizes["rebalance_rows"], wall),
                     "note": "wall includes process start, imports, model loads (once for run.json on the CPU, once per worker)"}
        stats = work / "run" / "stats" / "stages.json"
        if stats.exists():
            stages = json.loads(stats.read_text())
            out["stages"] = stages
            embed = stages.get("embed", {}) if isinstance(stages, dict) else {}
            if embed.get("wall_seconds"):
                out["embed_stage_seconds"] = embed["wall_seconds"]
                out["embed_stage_rows_per_s"] = rate(sizes["rebalance_rows"], embed["wall_seconds"])
        report = json.loads((work / "run" / "report.json").read_text())
        out["report_rows"] = report.get("rows")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def machine(args) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": args.threads}
    for module in ("torch", "torchvision", "open_clip", "faiss", "numpy", "pyarrow", "polars"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - a missing module is a fact to record
            info[module] = f"unavailable: {type(err).__name__}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small sizes (automatic without CUDA)")
    ap.add_argument("--model", default=None, help="open_clip name, random init (default ViT-B-32; 'tiny' with --small)")
    ap.add_argument("--sections", default="embed,faiss,rebalance")
    ap.add_argument("--threads", type=int, default=None, help="decode threads (default: CPUs)")
    ap.add_argument("--executor", default="auto", choices=["auto", "local", "ray"], help="for the rebalance section")
    ap.add_argument("--rebalance-timeout", type=int, default=300)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check_{cuda,cpu_check}.json)")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    device = "cuda" if cuda else "cpu"
    args.threads = args.threads or max(1, min(16, os.cpu_count() or 1))
    sizes = SMALL if small else FULL
    args.model = model_name(args.model or ("tiny" if small else "ViT-B-32"))
    kind = "cuda" if cuda and not small else ("cuda_small" if cuda else "cpu_check")
    result: dict = {"benchmark": "issue 16 GPU check: embed, faiss k-means/assignment, rebalance with embed",
                    "kind": kind, "sizes": sizes, "machine": machine(args), "sections": {}}
    started = time.perf_counter()
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        t0 = time.perf_counter()
        try:
            if name == "embed":
                section = section_embed(args, sizes, device)
            elif name == "faiss":
                section = section_faiss(sizes, device)
            elif name == "rebalance":
                section = section_rebalance(args, sizes, device)
            else:
                raise ValueError(f"unknown section {name!r} (embed, faiss, rebalance)")
        except Exception as err:  # noqa: BLE001 - one failed section must not lose the others' figures
            section = {"error": f"{type(err).__name__}: {str(err)[:2000]}", "traceback": traceback.format_exc()[-4000:]}
        section["section_seconds"] = round(time.perf_counter() - t0, 2)
        result["sections"][name] = section
        print(json.dumps({name: {k: v for k, v in section.items() if k not in ("stages", "traceback")}}), flush=True)
    result["total_seconds"] = round(time.perf_counter() - started, 2)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_check_{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return 1 if any("error" in s for s in result["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
