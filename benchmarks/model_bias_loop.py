"""A small CLIP training loop with a domain mixture, for the R&B arm of bench_model_bias.py.

It trains the same open_clip model, loss, optimiser (AdamW, open_clip_train's parameter groups
and defaults), cosine schedule and train transform as ``open_clip_train`` does, but draws every
batch from per-domain pools with a mixture ``p`` that can change between rounds: fixed (uniform,
or the offline ``balance.method: rnb`` mixture) or updated by ``mmbalance.mixer.OnlineMixer`` from
the final-layer gradients of the training steps themselves (R&B, docs/algorithms.md section 2).

The final layers are the two projections (``visual.proj``, ``text_projection``): y = x @ P, so a
sample's gradient of P is outer(x, dL/dy) and a domain's sum is ``X[d].T @ dY[d]``: one small
matrix product per batch, timed separately as the mixer's overhead.
"""

from __future__ import annotations

import io
import math
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Pool:
    """Decoded training samples grouped by domain."""

    images: list          # PIL images
    captions: list[str]
    domain: np.ndarray    # domain index per sample
    domains: list[str]

    def members(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.domain == d) for d in range(len(self.domains))]


def pool_from_webdataset(export_dir: str | Path) -> Pool:
    """Every sample of a webdataset export (``<domain>/*.tar``), once per tar member."""
    import json

    from PIL import Image

    root = Path(export_dir)
    summary = json.loads((root / "open_clip.json").read_text())
    domains = sorted(summary["domains"])
    images, captions, domain = [], [], []
    for d, name in enumerate(domains):
        for tar_path in sorted((root / summary["domains"][name]["dir"]).glob("*.tar")):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    key, ext = m.name.rsplit(".", 1)
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
            for key in sorted(members):
                sample = members[key]
                img = next(sample[e] for e in ("png", "jpg", "webp") if e in sample)
                images.append(Image.open(io.BytesIO(img)).convert("RGB"))
                captions.append(sample["txt"].decode("utf-8"))
                domain.append(d)
    return Pool(images, captions, np.array(domain, dtype=np.int64), domains)


@dataclass
class LoopConfig:
    model_dir: str
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    wd: float = 0.2
    seed: int = 0
    round_steps: int = 0          # R&B round length in steps; 0 = the mixture never changes
    lam: float = 3.0
    device: str = "cpu"


@dataclass
class LoopResult:
    model: object
    seconds: float
    mixer_seconds: float          # gradient sums + Gram matrix + update
    mixtures: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _param_groups(model, wd: float) -> list[dict]:
    # open_clip_train's split: no weight decay on gains, biases and the logit scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


def _lr_at(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    e = step - cfg.warmup
    es = max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr


def _encode(model, images, tokens):
    """Normalised features plus each projection's input x and output y (y keeps its gradient)."""
    import torch.nn.functional as F

    visual = model.visual
    pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
    y_img = pooled @ visual.proj
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    from open_clip.transformer import text_global_pool

    pooled_t = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    y_txt = pooled_t @ model.text_projection
    return F.normalize(y_img, dim=-1), F.normalize(y_txt, dim=-1), (pooled, y_img, pooled_t, y_txt)


def domain_gradients(x_img, y_img, x_txt, y_txt, domain, m: int):
    """(m, D): per domain, the sum over its samples of the gradient of both projections, outer(x, dL/dy)
    flattened as the projection parameters are (width x embed_dim); their sum is the batch's gradient."""
    import torch

    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(domain, m).to(x_img.dtype)
        return torch.cat([torch.einsum("bm,bi,bj->mij", onehot, x.detach(), y.grad).flatten(1)
                          for x, y in ((x_img, y_img), (x_txt, y_txt))], 1)


def _check_encode(model, preprocess, tokenizer, pool: Pool) -> None:
    """``_encode`` must give what open_clip's own encoders give (it re-traces them to keep x, y)."""
    import torch

    with torch.no_grad():
        images = torch.stack([preprocess(im) for im in pool.images[:4]])
        tokens = tokenizer(pool.captions[:4])
        f_img, f_txt, _ = _encode(model, images, tokens)
        ok = (torch.allclose(f_img, model.encode_image(images, normalize=True), atol=1e-5)
              and torch.allclose(f_txt, model.encode_text(tokens, normalize=True), atol=1e-5))
    if not ok:
        raise RuntimeError("model_bias_loop._encode no longer matches open_clip's encoders (open_clip changed?)")


def train(pool: Pool, cfg: LoopConfig, mixture: list[float] | None = None, online: bool = False) -> LoopResult:
    """Train a fresh model for ``cfg.steps`` batches drawn from ``pool`` with domain shares
    ``mixture`` (default uniform); with ``online`` the shares follow OnlineMixer every round."""
    import open_clip
    import torch

    from mmbalance.mixer import OnlineMixer

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, preprocess, _ = open_clip.create_model_and_transforms(f"local-dir:{cfg.model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{cfg.model_dir}")
    model.train()
    _check_encode(model, preprocess, tokenizer, pool)
    model.to(cfg.device)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, cfg.wd), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    m = len(pool.domains)
    members = pool.members()
    p = np.full(m, 1.0 / m) if mixture is None else np.asarray(mixture, dtype=np.float64) / np.sum(mixture)
    mixer = OnlineMixer(pool.domains, lam=cfg.lam, p_init=p) if online else None
    result = LoopResult(model, 0.0, 0.0, mixtures=[p.tolist()])
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        counts = rng.multinomial(cfg.batch_size, p)
        idx = np.concatenate([rng.choice(members[d], size=c) for d, c in enumerate(counts) if c > 0])
        dom = pool.domain[idx]
        images = torch.stack([preprocess(pool.images[i]) for i in idx]).to(cfg.device)
        tokens = tokenizer([pool.captions[i] for i in idx]).to(cfg.device)
        f_img, f_txt, (x_img, y_img, x_txt, y_txt) = _encode(model, images, tokens)
        if mixer is not None:
            y_img.retain_grad()
            y_txt.retain_grad()
        loss = loss_fn(f_img, f_txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        result.losses.append(float(loss.detach()))
        if mixer is not None:
            t0 = time.perf_counter()
            grads = domain_gradients(x_img, y_img, x_txt, y_txt, torch.from_numpy(dom).to(cfg.device), m)
            mixer.accumulate(grads, np.bincount(dom, minlength=m))
            if (step + 1) % cfg.round_steps == 0 and step + 1 < cfg.steps:
                p = mixer.step()
                result.mixtures.append(p.tolist())
            result.mixer_seconds += time.perf_counter() - t0
    result.seconds = time.perf_counter() - t_start
    model.eval().cpu()
    return result


def main(argv: list[str] | None = None) -> None:
    """One arm of the R&B comparison: train from a webdataset export, save the checkpoint (open_clip_train's
    ``{"state_dict": ...}`` layout) and ``loop.json`` (seconds, mixer seconds, mixtures per round)."""
    import argparse
    import json

    import torch

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--export", required=True, help="webdataset export directory (holds open_clip.json)")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--arm", choices=["uniform", "offline", "online"], required=True)
    ap.add_argument("--mixture", help="offline arm: mixture.json of a balance.method: rnb run (target shares)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--round-steps", type=int, default=100)
    ap.add_argument("--lam", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    pool = pool_from_webdataset(a.export)
    mixture = None
    if a.arm == "offline":
        if not a.mixture:
            ap.error("--arm offline needs --mixture")
        shares = {k: v["target_share"] for k, v in json.loads(Path(a.mixture).read_text())["domains"].items()}
        missing = [d for d in pool.domains if d not in shares]
        if missing:
            ap.error(f"{a.mixture}: no target share for domains {missing}")
        mixture = [shares[d] for d in pool.domains]
    cfg = LoopConfig(model_dir=a.model_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                     seed=a.seed, round_steps=a.round_steps if a.arm == "online" else 0, lam=a.lam, device=a.device)
    result = train(pool, cfg, mixture=mixture, online=a.arm == "online")
    out = Path(a.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": result.model.state_dict(), "step": a.steps}, out / "checkpoints" / "final.pt")
    (out / "loop.json").write_text(json.dumps({
        "arm": a.arm, "domains": pool.domains, "samples": len(pool.captions), "steps": a.steps,
        "batch_size": a.batch_size, "seconds": round(result.seconds, 3), "mixer_seconds": round(result.mixer_seconds, 4),
        "mixer_share": round(result.mixer_seconds / result.seconds, 6) if result.seconds else None,
        "mixtures": [[round(x, 6) for x in p] for p in result.mixtures],
        "final_loss": float(np.mean(result.losses[-50:])),
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
