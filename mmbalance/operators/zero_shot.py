"""Zero-shot tags from embeddings.

Each value has a prompt ensemble; its text embeddings (from the same CLIP model as the corpus
embeddings) are normalised, averaged and normalised again. An explicit "none" class (no person,
...) competes with the values. Scores follow the model's training loss: for CLIP (softmax
contrastive loss) a softmax over cosine similarities divided by a temperature (CLIP's logit scale
100 is temperature 0.01); for SigLIP (sigmoid loss, open_clip models with a ``logit_bias``) an
independent sigmoid per class of ``cos * exp(logit_scale) + logit_bias``, the model's learned scale
and bias, so a score is the model's probability that the prompt matches. The hard tag is the argmax
class, or null when the argmax is "none" or its score is below the threshold. Image-side scores
use the image embedding, text-side scores the caption embedding. Several sources of one attribute
are combined in ``combine``; the assign step tags rows with these functions (``assign``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import NONE_VALUE, Vocabulary

Scoring = Literal["softmax", "sigmoid"]
SCORING_CHOICES = ("auto", "softmax", "sigmoid")


@dataclass(frozen=True)
class ClassEmbeddings:
    """Unit text embeddings per class: the values in order, then "none" when ``has_none``; with
    ``scoring="sigmoid"`` the model's learned ``logit_scale`` (exp applied) and ``logit_bias``."""

    values: tuple[str, ...]
    matrix: np.ndarray  # (C, d) float32
    has_none: bool
    scoring: Scoring = "softmax"
    logit_scale: float | None = None
    logit_bias: float | None = None
    # what made it (vocabulary, temperature, threshold, sides), saved with it under OUT/models/
    meta: dict = field(default_factory=dict, compare=False, repr=False)
    kind: ClassVar[str] = "zero_shot"

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be softmax or sigmoid, got {self.scoring!r}")
        if self.scoring == "sigmoid" and (self.logit_scale is None or self.logit_bias is None):
            raise ValueError("sigmoid scoring needs the model's logit_scale and logit_bias")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.values + ((NONE_VALUE,) if self.has_none else ())

    def scoring_meta(self) -> dict:
        """JSON-able scoring fields (saved beside the matrix; ``from_files`` reads them back)."""
        return {"scoring": self.scoring, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}

    def files(self) -> tuple[np.ndarray, dict]:
        """The matrix and its metadata for ``operators.models`` (kind ``zero_shot``)."""
        return self.matrix, {**self.meta, "kind": self.kind, "values": list(self.values), "has_none": self.has_none,
                             **self.scoring_meta()}

    @classmethod
    def from_files(cls, matrix: np.ndarray, meta: dict) -> "ClassEmbeddings":
        return cls(tuple(meta["values"]), matrix, meta["has_none"], meta.get("scoring", "softmax"),
                   meta.get("logit_scale"), meta.get("logit_bias"), meta)


def model_scoring(model, requested: str = "auto") -> dict:
    """How a model's zero-shot scores are made, from its trained head: an open_clip model with a
    learned ``logit_bias`` (SigLIP) gives sigmoid scoring with its scale and bias; otherwise
    (CLIP) softmax. ``requested`` forces one; sigmoid on a model without a bias is an error."""
    if requested not in SCORING_CHOICES:
        raise ValueError(f"scoring must be one of {SCORING_CHOICES}, got {requested!r}")
    bias = getattr(model, "logit_bias", None)
    scale = getattr(model, "logit_scale", None)
    scoring = ("sigmoid" if bias is not None else "softmax") if requested == "auto" else requested
    if scoring == "softmax":
        return {"scoring": "softmax", "logit_scale": None, "logit_bias": None}
    if bias is None or scale is None:
        raise ValueError("scoring sigmoid needs a model trained with the sigmoid loss (SigLIP: a learned logit_bias); "
                         "this model has none: use softmax")
    return {"scoring": "sigmoid", "logit_scale": float(np.exp(float(scale.detach().float().cpu().reshape(-1)[0]))),
            "logit_bias": float(bias.detach().float().cpu().reshape(-1)[0])}


def _unit_rows(m: np.ndarray, what: str) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if not np.all(np.isfinite(m)) or np.any(norms == 0):
        raise ValueError(f"{what}: embeddings must be finite and non-zero")
    return m / norms


def prompt_embeddings(
    prompts_per_value: Mapping[str, Sequence[str]],
    encode_text: Callable[[list[str]], np.ndarray],
    none_prompts: Sequence[str] = (),
) -> ClassEmbeddings:
    """Class embeddings from prompt ensembles; ``encode_text`` maps n prompts to an (n, d) array.

    All prompts go to the encoder in one call (the text tower runs once per run). Each prompt
    embedding is normalised before averaging so long prompts do not dominate the ensemble.
    """
    values = tuple(prompts_per_value)
    if NONE_VALUE in values:
        raise ValueError(f"'{NONE_VALUE}' is reserved for the none class; pass its prompts as none_prompts")
    groups = [list(prompts_per_value[v]) for v in values] + ([list(none_prompts)] if none_prompts else [])
    for v, g in zip(values, groups):
        if not g:
            raise ValueError(f"value {v!r} has no prompts")
    flat = [p for g in groups for p in g]
    emb = np.asarray(encode_text(flat), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"encode_text returned shape {emb.shape} for {len(flat)} prompts")
    emb = _unit_rows(emb, "prompt")
    bounds = np.cumsum([0] + [len(g) for g in groups])
    means = np.stack([emb[bounds[i] : bounds[i + 1]].mean(axis=0) for i in range(len(groups))])
    return ClassEmbeddings(values, _unit_rows(means, "prompt ensemble").astype(np.float32), bool(none_prompts))


def vocabulary_embeddings(vocab: Vocabulary, encode_text: Callable[[list[str]], np.ndarray],
                          scoring: dict | None = None) -> ClassEmbeddings:
    """Class embeddings of a shipped or user vocabulary (values with prompts, plus its none class);
    ``scoring`` as from ``model_scoring`` (default softmax)."""
    missing = [v for v in vocab.values if not vocab.prompts[v]]
    if missing:
        raise ValueError(f"{vocab.name}: values without prompts: {missing}")
    classes = prompt_embeddings({v: vocab.prompts[v] for v in vocab.values}, encode_text, vocab.none_prompts)
    return dataclasses.replace(classes, **scoring) if scoring else classes


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 copy of an embedding column (``arrays.embedding_matrix``) with unusable rows
    zeroed, and its valid-row mask."""
    from mmbalance.operators.arrays import embedding_matrix as matrix_of

    m, valid = matrix_of(column)
    m = np.array(m, dtype=np.float32, copy=True)
    m[~valid] = 0
    return m, valid


def class_probabilities(
    embeddings: np.ndarray, classes: ClassEmbeddings, temperature: float = 0.01, valid: np.ndarray | None = None
) -> np.ndarray:
    """(n, C) scores; NaN rows for invalid or zero embeddings. float32 softmax of cosine /
    temperature, or with ``classes.scoring == "sigmoid"`` the float64 per-class sigmoid of
    cosine * logit_scale + logit_bias (``temperature`` unused; float32 would round strong matches
    of several classes to 1.0 and tie the argmax)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    emb = np.asarray(embeddings, np.float32)
    if emb.shape[1] != classes.matrix.shape[1]:
        raise ValueError(f"embedding dim {emb.shape[1]} != prompt embedding dim {classes.matrix.shape[1]}")
    norms = np.linalg.norm(emb, axis=1)
    ok = (norms > 0) & np.isfinite(norms)
    if valid is not None:
        ok &= valid
    cosine = (emb @ classes.matrix.T) / np.where(ok, norms, 1)[:, None]
    if classes.scoring == "sigmoid":
        logits = cosine.astype(np.float64) * classes.logit_scale + classes.logit_bias
        p = np.exp(-np.logaddexp(0.0, -logits))  # sigmoid without overflow
    else:
        logits = cosine / temperature
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
    p[~ok] = np.nan
    return p if classes.scoring == "sigmoid" else p.astype(np.float32)


def hard_tags(probs: np.ndarray, classes: Sequence[str], threshold: float = 0.5) -> pa.Array:
    """Argmax class per row; null for NaN rows, for "none", and below ``threshold``."""
    n = probs.shape[0]
    filled = np.nan_to_num(probs, nan=-1.0)
    idx = filled.argmax(axis=1) if n else np.zeros(0, np.int64)
    top = filled[np.arange(n), idx]
    null = (top < threshold) | np.isnan(probs).any(axis=1)
    if NONE_VALUE in classes:
        null |= idx == list(classes).index(NONE_VALUE)
    return pc.take(pa.array(list(classes), pa.string()), pa.array(idx, pa.int32(), mask=null))


