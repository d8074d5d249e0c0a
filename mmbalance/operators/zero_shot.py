"""Zero-shot tags from embeddings, the combination of tag sources, and the tagging audit.

Zero-shot: each value has a prompt ensemble; its text embeddings (from the same CLIP model as the
corpus embeddings) are normalised, averaged and normalised again. An explicit "none" class (no
person, ...) competes with the values. Scores follow the model's training loss: for CLIP (softmax
contrastive loss) a softmax over cosine similarities divided by a temperature (CLIP's logit scale
100 is temperature 0.01); for SigLIP (sigmoid loss, open_clip models with a ``logit_bias``) an
independent sigmoid per class of ``cos * exp(logit_scale) + logit_bias``, the model's learned scale
and bias, so a score is the model's probability that the prompt matches. The hard tag is the argmax
class, or null when the argmax is "none" or its score is below the threshold. Image-side scores
use the image embedding, text-side scores the caption embedding.

Combination: an attribute can have several sources (zero-shot image/text, caption lexicon, a
given column); ``combine_sources`` applies one rule and records which sources fired as a bitmask.

Audit: counts that merge across shards by summing (prevalence per source, pairwise agreement,
rows tagged) and a bottom-k uid sample per value that merges exactly across shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import NONE_VALUE, Vocabulary
from mmbalance.operators.hashing import audit_priority
from mmbalance.operators.lexicon import BOTH_SEPARATOR, source_tag_column
from mmbalance.schemas.contract import fired_column, tag_column

IMAGE_SOURCE, TEXT_SOURCE = "image", "text"
CombineRule = Literal["any", "all", "image", "text", "vote", "mean"]
COMBINE_RULES = ("any", "all", "image", "text", "vote", "mean")


def score_column(name: str, source: str) -> str:
    """Soft scores of one source: fixed_size_list<float16> over the classes (values, then none)."""
    return f"score.{name}.{source}"




# ---------------------------------------------------------------------------------------------
# Zero-shot


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


def scores_array(probs: np.ndarray, classes: Sequence[str]) -> pa.FixedSizeListArray:
    """Soft scores as fixed_size_list<float16> (half the bytes; 1e-3 precision is plenty)."""
    n, c = probs.shape
    valid = ~np.isnan(probs).any(axis=1)
    values = pa.array(np.nan_to_num(probs, nan=0.0).astype(np.float16).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, c, mask=pa.array(~valid))


@dataclass(frozen=True)
class ZeroShotAttribute:
    name: str
    classes: ClassEmbeddings
    temperature: float = 0.01
    threshold: float = 0.5


class ZeroShotTagger:
    """Ray Data operator: zero-shot scores and tags from the image and/or caption embeddings.

    Appends, per attribute and per source (``image``, ``text``), ``score.<name>.<source>`` and
    ``tag.<name>.<source>``. Prompt embeddings are computed once by the caller and passed in.
    """

    def __init__(self, attributes: Sequence[ZeroShotAttribute], image_column: str | None = None, text_column: str | None = None):
        if not image_column and not text_column:
            raise ValueError("zero-shot needs an image or a text embedding column")
        self.attributes = list(attributes)
        self.columns = {s: c for s, c in ((IMAGE_SOURCE, image_column), (TEXT_SOURCE, text_column)) if c}

    def tag(self, table: pa.Table) -> pa.Table:
        data: dict[str, pa.Array] = {}
        for source, column in self.columns.items():
            emb, valid = embedding_matrix(table.column(column))
            for a in self.attributes:
                probs = class_probabilities(emb, a.classes, a.temperature, valid)
                data[score_column(a.name, source)] = scores_array(probs, a.classes.classes)
                data[source_tag_column(a.name, source)] = hard_tags(probs, a.classes.classes, a.threshold)
        return pa.table(data)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tags = self.tag(batch)
        for name, column in zip(tags.column_names, tags.columns):
            batch = batch.append_column(name, column)
        return batch


def scores_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, C) float32 back from a ``score.*`` column; NaN rows where it is null."""
    m, valid = embedding_matrix(column)
    m[~valid] = np.nan
    return m


# ---------------------------------------------------------------------------------------------
# Combination


@dataclass
class SourceTags:
    """One source's tags for an attribute; ``probs`` (n, C over values then none) only for ``mean``.

    ``modality`` is ``image`` or ``text`` (caption lexicon and caption embeddings are text).
    """

    name: str
    modality: Literal["image", "text"]
    tags: pa.Array | pa.ChunkedArray
    probs: np.ndarray | None = None


def _codes(sources: Sequence[SourceTags]) -> tuple[np.ndarray, list[str]]:
    arrays = [s.tags.combine_chunks() if isinstance(s.tags, pa.ChunkedArray) else s.tags for s in sources]
    universe = pc.unique(pa.concat_arrays([pc.cast(a, pa.string()) for a in arrays])).drop_null()
    codes = np.stack(
        [pc.fill_null(pc.index_in(pc.cast(a, pa.string()), value_set=universe), -1).to_numpy(zero_copy_only=False) for a in arrays],
        axis=1,
    )
    return codes.astype(np.int64), universe.to_pylist()


def _agreed(codes: np.ndarray) -> np.ndarray:
    """The code all tagging sources share, -1 when none tagged or they disagree."""
    fired = codes >= 0
    hi = np.where(fired, codes, -1).max(axis=1)
    lo = np.where(fired, codes, np.iinfo(np.int64).max).min(axis=1)
    return np.where(fired.any(axis=1) & (hi == lo), hi, -1)


def _plurality(codes: np.ndarray) -> np.ndarray:
    """The most frequent code among tagging sources; -1 on ties or when none tagged."""
    fired = codes >= 0
    votes = ((codes[:, :, None] == codes[:, None, :]) & fired[:, None, :]).sum(axis=2) * fired
    best = votes.max(axis=1)
    leaders = (votes == best[:, None]) & fired
    code = np.where(leaders, codes, -1).max(axis=1)
    unique = np.all(~leaders | (codes == code[:, None]), axis=1)
    return np.where((best > 0) & unique, code, -1)


def _one_hot_probs(tags: pa.Array, values: Sequence[str], has_none: bool) -> np.ndarray:
    """Probabilities implied by hard tags: one-hot, split evenly for "a+b"; NaN where null."""
    out = np.full((len(tags), len(values) + has_none), np.nan, np.float32)
    col = {v: j for j, v in enumerate(values)}
    for i, t in enumerate(tags.to_pylist()):
        if t is None:
            continue
        parts = [col[p] for p in t.split(BOTH_SEPARATOR) if p in col]
        if parts:
            out[i] = 0
            out[i, parts] = 1.0 / len(parts)
    return out


def combine_sources(
    sources: Sequence[SourceTags],
    rule: CombineRule,
    values: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> tuple[pa.Array, np.ndarray]:
    """Combined tag per row and the int32 bitmask of the sources that fired (bit j = sources[j]).

    - ``any``: the value every tagging source agrees on (sources that abstain don't count);
      disagreement gives null.
    - ``all``: a tag only when every source tagged and all agree.
    - ``image`` / ``text``: ``any`` over the sources of that modality only.
    - ``vote``: the value most tagging sources give; a tie gives null.
    - ``mean``: mean probability over sources with a score for the row (hard-tag sources count as
      one-hot); the argmax value when it is not "none" and reaches ``threshold``. Needs ``values``.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"rule must be one of {COMBINE_RULES}, got {rule!r}")
    if not sources:
        raise ValueError("combine_sources needs at least one source")
    if len(sources) > 31:
        raise ValueError("at most 31 sources (int32 bitmask)")
    codes, universe = _codes(sources)
    fired = ((codes >= 0) * (1 << np.arange(len(sources)))).sum(axis=1).astype(np.int32)
    if rule == "mean":
        if values is None:
            raise ValueError("rule 'mean' needs the attribute's values")
        has_none = any(s.probs is not None and s.probs.shape[1] == len(values) + 1 for s in sources)
        classes = list(values) + ([NONE_VALUE] if has_none else [])
        stack = []
        for s in sources:
            p = s.probs
            if p is None:
                tags = s.tags.combine_chunks() if isinstance(s.tags, pa.ChunkedArray) else s.tags
                p = _one_hot_probs(tags, values, has_none)
            elif p.shape[1] == len(values) and has_none:
                p = np.concatenate([p, np.zeros((len(p), 1), p.dtype)], axis=1)
            if p.shape != (len(codes), len(classes)):
                raise ValueError(f"source {s.name}: probs shape {p.shape}, expected {(len(codes), len(classes))}")
            stack.append(p)
        probs = np.stack(stack)
        counted = (~np.isnan(probs).any(axis=2)).sum(axis=0)
        with np.errstate(invalid="ignore"):
            mean = np.nansum(probs, axis=0) / np.where(counted, counted, 1)[:, None]
        mean[counted == 0] = np.nan
        return hard_tags(mean, classes, threshold), fired
    if rule in ("image", "text"):
        codes = np.where(np.array([s.modality == rule for s in sources])[None, :], codes, -1)
        code = _agreed(codes)
    elif rule == "any":
        code = _agreed(codes)
    elif rule == "all":
        code = np.where((codes >= 0).all(axis=1), _agreed(codes), -1)
    else:
        code = _plurality(codes)
    return pc.take(pa.array(universe, pa.string()), pa.array(code, pa.int32(), mask=code < 0)), fired


def fired_sources(mask: np.ndarray | int, names: Sequence[str]) -> list[list[str]] | list[str]:
    """Decode a fired bitmask (one int or an array) into source names."""
    if np.isscalar(mask):
        return [n for j, n in enumerate(names) if int(mask) >> j & 1]
    return [[n for j, n in enumerate(names) if int(m) >> j & 1] for m in np.asarray(mask)]


def combined_columns(name: str, sources: Sequence[SourceTags], rule: CombineRule, values=None, threshold=0.5) -> pa.Table:
    """``tag.<name>`` and ``fired.<name>`` as a table, ready to append to the tags sidecar."""
    tags, fired = combine_sources(sources, rule, values, threshold)
    return pa.table({tag_column(name): tags, fired_column(name): pa.array(fired, pa.int32())})


# ---------------------------------------------------------------------------------------------
# Audit

NULL_KEY = "<null>"  # JSON-friendly key for untagged rows


def _value_counts(tags: pa.Array) -> dict[str, int]:
    out = {}
    for item in pc.value_counts(tags).to_pylist():
        out[NULL_KEY if item["values"] is None else item["values"]] = int(item["counts"])
    return out


def audit_counts(tags: Mapping[str, pa.Array | pa.ChunkedArray]) -> dict:
    """Mergeable counts for one shard: rows; per source the rows per value (``<null>`` untagged);
    per pair of sources the joint counts of their values where both tagged.

    ``tags`` maps source names (e.g. ``image``, ``text``, ``caption``, ``combined``) to tag arrays.
    """
    arrays = {k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v) for k, v in tags.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError("all tag arrays must have the same length")
    out = {"rows": lengths.pop() if lengths else 0, "values": {}, "joint": {}}
    names = list(arrays)
    for name in names:
        out["values"][name] = _value_counts(arrays[name])
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = pc.and_(arrays[a].is_valid(), arrays[b].is_valid())
            pairs = pa.table({"a": arrays[a].filter(both), "b": arrays[b].filter(both)})
            joint: dict[str, dict[str, int]] = {}
            for item in pairs.group_by(["a", "b"]).aggregate([([], "count_all")]).to_pylist():
                joint.setdefault(item["a"], {})[item["b"]] = int(item["count_all"])
            out["joint"][f"{a}|{b}"] = joint
    return out


def merge_audit(a: dict, b: dict) -> dict:
    """Sum two ``audit_counts`` results (or any nested dicts of ints)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = merge_audit(a.get(k, {}), v)
        else:
            out[k] = a.get(k, 0) + v
    return out


def summarise_audit(counts: dict) -> dict:
    """Prevalence per value among tagged rows, rows tagged per source, and per pair of sources the
    agreement rate and Cohen's kappa on rows both tagged."""
    rows = counts["rows"]
    out: dict = {"rows": rows, "sources": {}, "agreement": {}}
    for source, vc in counts["values"].items():
        tagged = sum(c for v, c in vc.items() if v != NULL_KEY)
        out["sources"][source] = {
            "tagged": tagged,
            "tagged_share": tagged / rows if rows else 0.0,
            "prevalence": {v: c / tagged for v, c in sorted(vc.items()) if v != NULL_KEY} if tagged else {},
            "counts": dict(sorted(vc.items())),
        }
    for pair, joint in counts["joint"].items():
        total = sum(c for row in joint.values() for c in row.values())
        agree = sum(row.get(v, 0) for v, row in joint.items())
        pa_ = {v: sum(row.values()) / total for v, row in joint.items()} if total else {}
        pb: dict[str, float] = {}
        for row in joint.values():
            for v, c in row.items():
                pb[v] = pb.get(v, 0.0) + c / total
        expected = sum(pa_.get(v, 0.0) * pb.get(v, 0.0) for v in set(pa_) | set(pb))
        observed = agree / total if total else float("nan")
        kappa = (observed - expected) / (1 - expected) if total and expected < 1 else float("nan")
        out["agreement"][pair] = {"both_tagged": total, "agreement": observed, "kappa": kappa, "confusion": joint}
    return out


def sample_uids(uids: pa.Array | pa.ChunkedArray, tags: pa.Array | pa.ChunkedArray, per_value: int, seed: int) -> dict[str, list[tuple[int, str]]]:
    """Per value, the ``per_value`` uids with the smallest seeded hash: (hash, uid) pairs.

    A bottom-k sample: merging shards' samples with ``merge_uid_samples`` gives exactly the sample
    of the whole corpus, whatever the sharding, and the same uids on every rerun with the seed.
    """
    uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    tags = tags.combine_chunks() if isinstance(tags, pa.ChunkedArray) else tags
    h = audit_priority(uids, seed)
    # one sort for all values (a vocabulary can have hundreds): by value, then hash, then row
    encoded = pc.dictionary_encode(pc.cast(tags, pa.string()))
    code = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((np.arange(len(code)), h, code))
    order = order[code[order] >= 0]
    starts = np.flatnonzero(np.r_[True, code[order][1:] != code[order][:-1]]) if len(order) else order
    names = encoded.dictionary.to_pylist()
    out: dict[str, list[tuple[int, str]]] = {}
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
        pick = order[lo : min(hi, lo + per_value)]
        out[names[code[order[lo]]]] = [(int(h[i]), u) for i, u in zip(pick, uids.take(pa.array(pick)).to_pylist())]
    return out


def merge_uid_samples(samples: Sequence[dict[str, list[tuple[int, str]]]], per_value: int) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for s in samples:
        for v, items in s.items():
            out.setdefault(v, []).extend(items)
    return {v: sorted(set(map(tuple, items)))[:per_value] for v, items in sorted(out.items())}
