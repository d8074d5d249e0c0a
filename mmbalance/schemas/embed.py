"""The recipe's ``embed:`` section: how image and text embeddings are made (or ingested).

Three sources, in the order the pipeline should prefer them:
  * recipe-mapped columns (``input.columns.image_embedding`` / ``text_embedding``): no model;
  * ``npz``: DataComp-style ``<stem>.npz`` files beside the shards: no model, no torch;
  * an open_clip model run over ``input.columns.image`` / ``caption``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmbalance.schemas.balance import StrictModel

RANDOM_INIT = "random"

# DataComp ships OpenAI CLIP features per shard: b32 = ViT-B/32 (512-d), l14 = ViT-L/14 (768-d).
DATACOMP_VARIANTS = {
    "b32": {"image_key": "b32_img", "text_key": "b32_txt", "dim": 512, "model": "ViT-B-32", "pretrained": "openai"},
    "l14": {"image_key": "l14_img", "text_key": "l14_txt", "dim": 768, "model": "ViT-L-14", "pretrained": "openai"},
}


class NpzSpec(StrictModel):
    """Embeddings from ``<shard stem>.npz`` beside each shard, one row per shard row, in order."""

    variant: Literal["b32", "l14"] = "l14"
    # Override the array names (defaults: DataComp's <variant>_img / <variant>_txt).
    image_key: str | None = None
    text_key: str | None = None
    suffix: str = ".npz"

    def keys(self) -> tuple[str, str]:
        v = DATACOMP_VARIANTS[self.variant]
        return self.image_key or v["image_key"], self.text_key or v["text_key"]


class EmbedSpec(StrictModel):
    """open_clip model selection and how the embed actors run. Execution fields never change results."""

    # open_clip architecture name (ViT-B-32), or 'hf-hub:org/repo' / 'local-dir:/path' (config + weights).
    model: str = "ViT-B-32"
    # open_clip tag (laion2b_s34b_b79k), 'hf-hub:org/repo', a checkpoint path or URI, or 'random'
    # (random init, seeded: for tests and benchmarks). Required unless the model names a hub/local dir.
    pretrained: str | None = None
    seed: int = 0  # only used by pretrained: random
    # auto: fp16 autocast on CUDA, fp32 on CPU. amp = fp16 autocast; fp16/bf16 = open_clip low-precision
    # weights. Low precision falls back to fp32 on CPU. Outputs are always float16 and unit-norm.
    precision: Literal["auto", "fp32", "amp", "fp16", "bf16"] = "auto"
    batch_size: int = Field(default=256, gt=0)  # images per model forward
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when num_gpus > 0 and available
    num_gpus: float = Field(default=0.0, ge=0)  # per actor; 1 with actors = GPUs: one actor per GPU
    num_cpus: float = Field(default=1.0, gt=0)  # per actor; also torch intra-op threads
    actors: int = Field(default=1, gt=0)  # actor pool size
    decode_threads: int | None = Field(default=None, gt=0)  # default: the actor's CPUs
    # A row whose image cannot be used: reject it, or keep it with a text embedding only.
    on_image_error: Literal["reject", "text_only"] = "reject"
    # A row with a null/empty caption: keep it with an image embedding only, or reject it.
    on_missing_caption: Literal["image_only", "reject"] = "image_only"
    max_image_pixels: int = Field(default=89_478_485, gt=0)  # decompression-bomb guard (PIL's default)
    # Decode JPEGs at a reduced DCT scale (>= the model's input size): faster, embeddings differ slightly.
    jpeg_draft: bool = False
    # How images become pixels. pil: PIL decodes, resizes and crops on the CPU (open_clip's own transform).
    # torch: JPEGs decoded by torchvision (batched nvJPEG on CUDA, libjpeg-turbo on CPU) and resized and
    # cropped as tensors on the model's device; PNG/WebP/GIF, CMYK and truncated JPEGs still go through PIL.
    # auto: torch on CUDA, pil on CPU. The two agree within a level or two of 255 per pixel.
    image_decode: Literal["auto", "pil", "torch"] = "auto"
    npz: NpzSpec | None = None  # DataComp .npz ingest instead of a model
    # Embed captions only, with no image column mapped (image clusters and zero-shot then have nothing)
    text_only: bool = False

    @model_validator(mode="after")
    def _check_weights(self) -> "EmbedSpec":
        schema_model = self.model.startswith(("hf-hub:", "local-dir:"))
        if self.npz is None and self.pretrained is None and not schema_model:
            raise ValueError(
                f"embed.pretrained is required for model '{self.model}': an open_clip tag, 'hf-hub:org/repo', "
                f"a checkpoint path, or '{RANDOM_INIT}'"
            )
        if self.image_decode == "torch" and self.jpeg_draft:
            raise ValueError("embed.jpeg_draft is a PIL decode option: it cannot be combined with image_decode: torch")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("embed.device is 'cuda' but embed.num_gpus is 0: give each actor a GPU")
        return self

    @property
    def uses_model(self) -> bool:
        return self.npz is None

    def threads(self) -> int:
        return max(1, int(self.num_cpus))

    def resources(self) -> dict[str, float]:
        """Ray resources for one embed actor."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


# -- the embeddings sidecar (embeddings/<shard_id>.parquet) ------------------------------------

IMAGE_EMB, TEXT_EMB, EMBED_NOTE = "image_emb", "text_emb", "embed_note"
SIDECAR_METADATA_KEY = b"mmbalance.embed"


class EmbeddingMismatchError(ValueError):
    """Embeddings made by different models would be mixed; the message is one line."""


def sidecar_schema(dim: int, info: dict | None = None):
    """Rows that have at least one embedding; ``row`` indexes the source shard. A missing half is null
    and ``embed_note`` says why. ``info`` (the model record) goes into the schema metadata."""
    import json

    import pyarrow as pa

    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field(IMAGE_EMB, pa.list_(pa.float16(), dim)),
        pa.field(TEXT_EMB, pa.list_(pa.float16(), dim)),
        pa.field(EMBED_NOTE, pa.string()),
    ]
    meta = {SIDECAR_METADATA_KEY: json.dumps(info, sort_keys=True).encode()} if info is not None else None
    return pa.schema(fields, metadata=meta)


def info_from_schema(schema) -> dict | None:
    """The model record stored in a sidecar's schema metadata, if any."""
    import json

    raw = (schema.metadata or {}).get(SIDECAR_METADATA_KEY)
    return json.loads(raw) if raw else None


def embedding_identity(info: dict) -> dict:
    """What must match for two sets of embeddings to live in one space.

    Tags and hub names identify published weights; files and random inits are identified by hash.
    Precision, device and batch size are left out: they do not change the space.
    """
    kind = info.get("pretrained_kind")
    if kind in ("tag", "hub"):
        weights = f"{kind}:{info.get('pretrained')}"
    else:
        weights = info.get("checkpoint_sha256") or info.get("weights_sha256") or info.get("pretrained")
    return {"model": info.get("model"), "weights": weights, "embedding_dim": info.get("embedding_dim")}


def describe_embeddings(info: dict) -> str:
    ident = embedding_identity(info)
    weights = str(ident["weights"])
    if len(weights) == 64 and all(c in "0123456789abcdef" for c in weights):
        weights = f"sha256 {weights[:12]}"
    return f"{ident['model']} [{weights}] {ident['embedding_dim']}-d"


def check_same_embeddings(expected: dict, found: dict, expected_from: str, found_from: str) -> None:
    """Refuse to mix embeddings from different models (one-line error naming both sides)."""
    if embedding_identity(expected) != embedding_identity(found):
        raise EmbeddingMismatchError(
            f"{found_from} holds embeddings from {describe_embeddings(found)}, but {expected_from} has "
            f"{describe_embeddings(expected)}: refusing to mix embeddings from different models "
            f"(use a new run directory or the same embed settings)"
        )
