"""Embed benchmark (issue 4): images/s and captions/s per stage, and end to end, for random-init
open_clip models on JPEG bytes (no downloads: weights are random, speed does not depend on them).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_embed.py                     # CPU: tiny + ViT-S-32-alt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_embed.py --model tiny --images 512
    bash benchmarks/gpu_embed.sh                                                     # GPU: ViT-B-32, batch 256

Stages, each timed alone on one thread (rates are per thread):
  decode      JPEG bytes -> RGB PIL image          (images/s)
  preprocess  resize + centre crop -> uint8 array  (images/s)
  tokenize    captions -> token ids                (captions/s)
  image_model uint8 batch -> unit fp16 embeddings  (images/s; ToTensor/Normalize on the device)
  text_model  token batch -> unit fp16 embeddings  (captions/s)
then end to end: ``embed_table`` on a table of JPEG bytes + captions with ``--decode-threads`` decode
threads overlapping the model (rows/s, wall clock). Writes JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmbalance.operators.embed.images import decode_image  # noqa: E402
from mmbalance.operators.embed.model import load_model  # noqa: E402
from mmbalance.operators.embed.stage import EmbedColumns, embed_table  # noqa: E402
from mmbalance.schemas.embed import EmbedSpec  # noqa: E402

TINY = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}
WORDS = ("a photo of the teacher nurse engineer farmer chef standing sitting in at on near city studio "
         "outdoors portrait close-up old young smiling with red blue green car dog cat tree house").split()


def jpeg_pool(count: int, long_side: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients + texture + noise), aspect ratios between 3:4 and 16:9."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        aspect = rng.uniform(0.75, 1.78)
        w, h = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.005, 0.05, 3)
        img = np.stack([127 + 100 * np.sin(f[c] * (x + y * rng.uniform(-1, 1)) + rng.uniform(0, 6)) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 40, n)
    return [" ".join(rng.choice(WORDS, k)) for k in lengths]


def model_spec(name: str, args, workdir: str) -> EmbedSpec:
    model = name
    if name == "tiny":
        d = Path(workdir) / "tiny"
        d.mkdir(exist_ok=True)
        (d / "open_clip_config.json").write_text(json.dumps(TINY))
        model = f"local-dir:{d}"
    return EmbedSpec(model=model, pretrained="random", precision=args.precision, batch_size=args.batch_size,
                     device=args.device, num_gpus=args.num_gpus, num_cpus=args.threads,
                     decode_threads=args.decode_threads, jpeg_draft=args.jpeg_draft, image_decode=args.image_decode)


def sync(bundle) -> None:
    if bundle.device == "cuda":
        import torch

        torch.cuda.synchronize()


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def bench_model(name: str, args, pool: list[bytes], workdir: str) -> dict:
    spec = model_spec(name, args, workdir)
    t0 = time.perf_counter()
    bundle = load_model(spec)
    load_s = time.perf_counter() - t0
    pre = bundle.preprocessor
    draft = pre.draft_size if spec.jpeg_draft else None
    n_stage = min(args.stage_images, len(pool) * 8)
    sample = [pool[i % len(pool)] for i in range(n_stage)]
    texts = captions(n_stage, seed=1)
    stages = {}

    t0 = time.perf_counter()
    decoded = [decode_image(b, draft=draft) for b in sample]
    stages["decode"] = {"images_per_s": rate(n_stage, time.perf_counter() - t0)}
    t0 = time.perf_counter()
    pixels = np.stack([pre.pixels(im) for im in decoded])
    stages["preprocess"] = {"images_per_s": rate(n_stage, time.perf_counter() - t0)}
    t0 = time.perf_counter()
    tokens = bundle.tokenize(texts)
    stages["tokenize"] = {"captions_per_s": rate(n_stage, time.perf_counter() - t0)}

    bs = spec.batch_size
    batches = [pixels[i : i + bs] for i in range(0, n_stage, bs)]
    token_batches = [tokens[i : i + bs] for i in range(0, n_stage, bs)]
    for _ in range(args.warmup):  # cuDNN/cuBLAS autotune, allocator growth
        bundle.encode_images(batches[0])
        bundle.encode_tokens(token_batches[0])
    sync(bundle)
    t0 = time.perf_counter()
    for b in batches:
        bundle.encode_images(b)  # returns host fp16: includes the device round trip
    sync(bundle)
    stages["image_model"] = {"images_per_s": rate(n_stage, time.perf_counter() - t0)}
    t0 = time.perf_counter()
    for t in token_batches:
        bundle.encode_tokens(t)
    sync(bundle)
    stages["text_model"] = {"captions_per_s": rate(n_stage, time.perf_counter() - t0)}

    # end to end on a table of JPEG bytes + captions
    n = args.images
    table = pa.table({
        "uid": [f"u{i}" for i in range(n)],
        "image": pa.array([pool[i % len(pool)] for i in range(n)], pa.binary()),
        "caption": captions(n, seed=2),
    })
    cols = EmbedColumns("uid", "image", "caption")
    embed_table(table.slice(0, min(n, bs)), bundle, cols)  # warm the pools
    timings: dict = {}
    t0 = time.perf_counter()
    sidecar, rejects = embed_table(table, bundle, cols, timings=timings)
    sync(bundle)
    wall = time.perf_counter() - t0
    assert sidecar.num_rows == n and rejects.num_rows == 0
    thread_seconds = {k: round(v, 3) for k, v in timings.items() if k not in ("images", "captions")}
    bundle.close()
    result = {
        "model": name,
        "embedding_dim": bundle.dim,
        "image_size": list(pre.size),
        "device": bundle.device,
        "precision": bundle.info["precision"],
        "batch_size": bs,
        "load_seconds": round(load_s, 2),
        "stages": stages,
        "end_to_end": {"rows": n, "seconds": round(wall, 3), "images_per_s": rate(n, wall),
                       "decode_threads": spec.decode_threads or spec.threads(), "thread_seconds": thread_seconds},
    }
    print(json.dumps(result), flush=True)
    return result


def machine(args) -> dict:
    import open_clip
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip.__version__, "torch_threads": args.threads,
            "omp_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}  # shared machines: read figures with it
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="open_clip name or 'tiny' (repeatable; default tiny + ViT-S-32-alt)")
    ap.add_argument("--images", type=int, default=None, help="rows for the end-to-end run (default 2048 tiny, 256 others)")
    ap.add_argument("--stage-images", type=int, default=256, help="images per isolated stage measurement")
    ap.add_argument("--pool", type=int, default=64, help="distinct JPEGs, cycled")
    ap.add_argument("--long-side", type=int, default=512, help="JPEG long side in pixels (img2dataset-style 512)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "amp", "fp16", "bf16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")), help="torch threads")
    ap.add_argument("--decode-threads", type=int, default=None)
    ap.add_argument("--jpeg-draft", action="store_true")
    ap.add_argument("--image-decode", default="auto", choices=["auto", "pil", "torch"],
                    help="embed.image_decode: torch = torchvision/nvJPEG decode + tensor resize (auto: torch on CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    models = args.model or ["tiny", "ViT-S-32-alt"]
    pool = jpeg_pool(args.pool, args.long_side)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            run_args = argparse.Namespace(**vars(args))
            if args.images is None:
                run_args.images = 2048 if name == "tiny" else 256
            results.append(bench_model(name, run_args, pool, workdir))
    out = {
        "benchmark": "open_clip embed stage: per-stage and end-to-end throughput, random-init weights",
        "machine": machine(args),
        "inputs": {"jpeg_long_side": args.long_side, "jpeg_pool": args.pool,
                   "mean_jpeg_bytes": int(np.mean([len(b) for b in pool])), "jpeg_draft": args.jpeg_draft,
                   "image_decode": args.image_decode},
        "results": results,
    }
    device = results[0]["device"] if results else "cpu"
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"embed_{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
