"""Bias and quality of a trained checkpoint on the rendered evaluation set, in numpy
(docs/algorithms.md section 9), for bench_model_bias.py.

The benchmark reports ``mmbalance evaluate``'s figures; this module recomputes the headline ones
from the raw embeddings with its own code, as an independent check of them (and served before
that command existed). Predicted gender of an image: argmax over values of the cosine to the
averaged, normalised text embeddings of that value's prompts, templated with the image's own
occupation ("a photo of a woman nurse."), as docs/algorithms.md section 9 allows.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mmbalance.synth_images import OCCUPATIONS, gender_prompts, label_prompts

GENDERS = ("woman", "man")


def load_checkpoint(model_dir: str, checkpoint: str | None):
    """A ``local-dir:`` model with an open_clip_train checkpoint (``state_dict``, ``module.``)."""
    import open_clip
    import torch

    model = open_clip.create_model(f"local-dir:{model_dir}")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def embed_eval(model, model_dir: str, table) -> dict[str, np.ndarray]:
    """Unit-norm image embeddings of the eval table and text embeddings of every prompt set."""
    import open_clip
    import torch
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")

    def text(prompts: list[str]) -> np.ndarray:
        with torch.no_grad():
            e = model.encode_text(tokenizer(prompts), normalize=True).double().numpy()
        return e

    def ensemble(prompt_sets: list[list[str]]) -> np.ndarray:
        flat = text([p for ps in prompt_sets for p in ps])
        e = flat.reshape(len(prompt_sets), -1, flat.shape[1]).mean(1)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    images = []
    with torch.no_grad():
        blobs = table.column("image").to_pylist()
        for start in range(0, len(blobs), 256):
            batch = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[start:start + 256]])
            images.append(model.encode_image(batch, normalize=True).double().numpy())
    occ = list(OCCUPATIONS)
    return {
        "image": np.concatenate(images),
        "label": ensemble([label_prompts()[o] for o in occ]),
        # [occupation, gender] -> prompts templated with both
        "attribute": np.stack([ensemble([[t.format(o=o) for t in gender_prompts()[g]] for g in GENDERS]) for o in occ]),
        "captions": text([c for c in table.column("caption").to_pylist() if c is not None]),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embeddings_from_evaluate(eval_out: str | Path, table) -> dict[str, np.ndarray]:
    """The embeddings ``mmbalance evaluate`` stored in ``eval_out`` (images and captions from
    ``embeddings/``, float16; every filled prompt from ``prompts.parquet``), arranged as
    ``embed_eval`` arranges its own: the metrics recomputed from exactly the vectors evaluate scored.
    Ensembles as docs/algorithms.md section 9 defines them (unit prompts averaged, normalised, float32)."""
    import pyarrow.parquet as pq

    sides = sorted(Path(eval_out, "embeddings").glob("*.parquet"))
    if len(sides) != 1:
        raise ValueError(f"{eval_out}: expected the embeddings of one evaluation file, found {len(sides)}")
    side = pq.read_table(sides[0])
    order = np.argsort(np.asarray(side.column("row").to_pylist()))
    if len(order) != table.num_rows:
        raise ValueError(f"{eval_out}: {len(order)} embedded images for {table.num_rows} rows")
    image = np.asarray(side.column("image_emb").to_pylist(), np.float64)[order]
    texts = side.column("text_emb").to_pylist()
    prompts = pq.read_table(Path(eval_out, "prompts.parquet")).to_pylist()

    def ensemble(kind: str, name: str, value: str, condition: str | None = None) -> np.ndarray:
        rows = [r["text_emb"] for r in prompts if (r["kind"], r["name"], r["value"], r["condition"]) == (kind, name, value, condition)]
        return _unit(_unit(np.asarray(rows, np.float64)).mean(axis=0)).astype(np.float32).astype(np.float64)

    occ = list(OCCUPATIONS)
    captioned = [i for i, c in enumerate(table.column("caption").to_pylist()) if c is not None]
    return {
        "image": _unit(image),
        "label": np.stack([ensemble("label", "occupation", o) for o in occ]),
        "attribute": np.stack([np.stack([ensemble("attribute", "gender", g, o) for g in GENDERS]) for o in occ]),
        "captions": _unit(np.asarray([texts[order[i]] for i in captioned], np.float64)),
    }


def max_skew_ndkl(ranked_attr: np.ndarray, pool_share: np.ndarray, k: int) -> tuple[float, float]:
    """MaxSkew@k and NDKL of one ranking (attribute index per ranked item) against the pool's shares."""
    onehot = np.eye(len(pool_share))[ranked_attr]
    counts = np.cumsum(onehot, axis=0)
    top = counts / np.arange(1, len(ranked_attr) + 1)[:, None]
    with np.errstate(divide="ignore"):
        skew = np.log(top[k - 1] / pool_share)
    kl = np.sum(np.where(top > 0, top * np.log(np.where(top > 0, top, 1) / pool_share), 0.0), axis=1)
    disc = 1 / np.log2(np.arange(2, len(ranked_attr) + 2))
    return float(np.max(skew)), float(np.sum(disc * kl) / np.sum(disc))


def metrics(emb: dict[str, np.ndarray], table, ks: tuple[int, ...] = (10, 100)) -> dict:
    """RB, AB (per occupation and per latent scene), MaxSkew@k and NDKL of occupation queries over
    the cued (gender-balanced) images, occupation accuracy, cue accuracy, caption recall."""
    occ_names = list(OCCUPATIONS)
    occ = np.array([occ_names.index(o) for o in table.column("occupation").to_pylist()])
    gender = np.array([GENDERS.index(g) if g is not None else -1 for g in table.column("gender").to_pylist()])
    scene_names = sorted(set(table.column("scene").to_pylist()))
    scene = np.array([scene_names.index(s) for s in table.column("scene").to_pylist()])
    img = emb["image"]
    pred_gender = np.argmax(np.einsum("nd,ngd->ng", img, emb["attribute"][occ]), axis=1)
    neutral = gender < 0
    woman_share = float(np.mean(pred_gender[neutral] == 0))
    by_occ = {o: float(np.mean(pred_gender[neutral & (occ == j)] == 0)) for j, o in enumerate(occ_names)}
    by_scene = {s: float(np.mean(pred_gender[neutral & (scene == j)] == 0)) for j, s in enumerate(scene_names)}
    planted = np.array([p for _, p in OCCUPATIONS.values()])
    # what AB reads for this model's predictions with the labels shuffled among the neutral images:
    # the floor a model with no association at all would show on a set of this size
    rng = np.random.default_rng(0)
    said_woman = pred_gender[neutral] == 0

    def null_ab(labels: np.ndarray, k: int) -> float:
        gaps = [max(abs(said_woman[perm == j].mean() - woman_share) for j in range(k))
                for perm in (rng.permutation(labels) for _ in range(200))]
        return float(np.mean(gaps))

    out = {
        "neutral_images": int(neutral.sum()),
        "woman_share": woman_share,
        "rb": abs(woman_share - 0.5),  # two values: |share_v - 0.5| is the same for both
        "ab": max(abs(v - woman_share) for v in by_occ.values()),
        "ab_scene": max(abs(v - woman_share) for v in by_scene.values()),
        "ab_null": null_ab(occ[neutral], len(occ_names)),
        "ab_scene_null": null_ab(scene[neutral], len(scene_names)),
        "woman_share_by_occupation": by_occ,
        "woman_share_by_scene": by_scene,
        "skew_correlation": float(np.corrcoef(planted, list(by_occ.values()))[0, 1]) if np.std(list(by_occ.values())) > 0 else 0.0,
        "accuracy": float(np.mean(np.argmax(img @ emb["label"].T, axis=1) == occ)),
        "cue_accuracy": float(np.mean(pred_gender[~neutral] == gender[~neutral])),
    }
    cued = np.flatnonzero(~neutral)
    pool_share = np.bincount(gender[cued], minlength=2) / len(cued)
    for k in ks:
        vals = [max_skew_ndkl(gender[cued][np.argsort(-(img[cued] @ emb["label"][j]), kind="stable")], pool_share, k)
                for j in range(len(occ_names))]
        out[f"maxskew@{k}"] = float(np.mean([v[0] for v in vals]))
        out["ndkl"] = float(np.mean([v[1] for v in vals]))
    # recall over the captioned pairs (captions are unique): rank of the partner, 0 = first
    paired = np.flatnonzero([c is not None for c in table.column("caption").to_pylist()])
    sim = img[paired] @ emb["captions"].T
    own = np.diag(sim)
    i2t_rank = np.sum(sim > own[:, None], axis=1)
    t2i_rank = np.sum(sim > own[None, :], axis=0)
    for k in (1, 5):
        out[f"i2t_r@{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_r@{k}"] = float(np.mean(t2i_rank < k))
    return out


def evaluate(model, model_dir: str, eval_path: str | Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(eval_path)
    return metrics(embed_eval(model, model_dir, table), table)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    import torch

    ap = argparse.ArgumentParser(description="Bias and quality of a checkpoint on the rendered evaluation set.")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--eval", required=True, help="eval.parquet from mmbalance.synth_images")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--evaluate-dir", help="also recompute the figures from the embeddings mmbalance evaluate stored here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import pyarrow.parquet as pq

    table = pq.read_table(a.eval)
    own = embed_eval(load_checkpoint(a.model_dir, a.checkpoint), a.model_dir, table)
    result = metrics(own, table)
    if a.evaluate_dir:
        theirs = embeddings_from_evaluate(a.evaluate_dir, table)
        result["from_evaluate_embeddings"] = metrics(theirs, table)
        result["embedding_max_abs_diff"] = {k: float(np.abs(own[k] - theirs[k]).max()) for k in ("image", "label", "attribute", "captions")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
