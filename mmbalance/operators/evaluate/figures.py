"""Every figure of one evaluation with its bootstrap interval: the content of evaluate.json.

``Evaluation`` holds the predictions (made once) and computes all figures for a (b, n) weight
matrix (``metrics``); ``estimate`` runs it on a row of ones and on the bootstrap replicates;
``differences`` pairs two evaluations of the same images replicate by replicate (same seed, same
resamples), so a difference's interval is that of the paired difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmbalance.operators.evaluate import metrics
from mmbalance.operators.evaluate.scoring import predict, predict_conditioned, query_scores
from mmbalance.operators.zero_shot import ClassEmbeddings

Key = tuple  # path of a figure inside evaluate.json, e.g. ("attributes", "gender", "rb")


@dataclass
class LabelPlan:
    name: str
    column: str
    values: list[str]
    classes: ClassEmbeddings  # the zero-shot classes, also the retrieval text queries


@dataclass
class AttributePlan:
    name: str
    column: str
    values: list[str]
    target: dict[str, float]
    classes: list[ClassEmbeddings]  # one set, or one per value of ``condition``
    condition: str | None = None  # the label the prompts are filled with


@dataclass
class EvalData:
    """The evaluated images, in a fixed order (shard path, row): the bootstrap resamples these."""

    uids: list[str]
    image: np.ndarray  # (n, d) unit image embeddings
    attributes: dict[str, np.ndarray]  # name -> value codes, -1 = neutral (no cue)
    labels: dict[str, np.ndarray]  # name -> value codes, -1 = no label
    text: np.ndarray | None = None  # (n, d) caption embeddings, rows without a caption zero
    has_text: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.uids)


@dataclass
class Evaluation:
    data: EvalData
    attributes: list[AttributePlan]
    labels: list[LabelPlan]
    temperature: float
    seed: int
    ks: list[int]
    recall_ks: list[int]

    def __post_init__(self):
        d, labels = self.data, {lab.name: lab for lab in self.labels}
        self.label_pred = {lab.name: predict(d.image, lab.classes, self.temperature) for lab in self.labels}
        self.attr_pred = {}
        for a in self.attributes:
            if a.condition is None:
                self.attr_pred[a.name] = predict(d.image, a.classes[0], self.temperature)
            else:
                self.attr_pred[a.name] = predict_conditioned(d.image, a.classes, d.labels[a.condition], self.temperature)
        self.pools = {a.name: metrics.balanced_pool(d.attributes[a.name], len(a.values), d.uids, self.seed)
                      for a in self.attributes}
        self.orders = {(a.name, lab.name): metrics.rankings(query_scores(d.image[self.pools[a.name]], lab.classes))
                       for a in self.attributes for lab in labels.values()}
        self.ranks = None
        if d.text is not None and d.has_text is not None and d.has_text.any():
            rows = np.flatnonzero(d.has_text)
            self.ranks = (rows, *metrics.match_ranks(d.image[rows], d.text[rows]))

    def skipped_ks(self, attribute: str) -> list[int]:
        return [k for k in self.ks if k > len(self.pools[attribute])]

    def figures(self, w: np.ndarray) -> dict[Key, np.ndarray]:
        """Every figure for each row of the (b, n) weights."""
        d, out = self.data, {}
        for lab in self.labels:
            truth, pred = d.labels[lab.name], self.label_pred[lab.name]
            out[("labels", lab.name, "accuracy")] = metrics.accuracy(pred, truth, w)
            per = metrics.accuracy_by_class(pred, truth, len(lab.values), w)
            for j, value in enumerate(lab.values):
                out[("labels", lab.name, "by_value", value, "accuracy")] = per[:, j]
        for a in self.attributes:
            base = ("attributes", a.name)
            cue, pred = d.attributes[a.name], self.attr_pred[a.name]
            neutral_pred = np.where(cue < 0, pred, -1)
            shares = metrics.value_shares(neutral_pred, len(a.values), w)
            for v, value in enumerate(a.values):
                out[base + ("share", value)] = shares[:, v]
            out[base + ("rb",)] = metrics.max_abs_gap(shares, np.array([a.target[v] for v in a.values]))
            out[base + ("accuracy",)] = metrics.accuracy(pred, cue, w)
            for lab in self.labels:
                assoc = metrics.association(neutral_pred, d.labels[lab.name], len(a.values), len(lab.values), w)
                key = base + ("ab", lab.name)
                out[key] = assoc["ab"]
                for v, value in enumerate(a.values):
                    out[key + ("overall_share", value)] = assoc["overall"][:, v]
                for j, label_value in enumerate(lab.values):
                    out[key + ("by_label", label_value, "gap")] = assoc["gap"][:, j]
                    for v, value in enumerate(a.values):
                        out[key + ("by_label", label_value, "share", value)] = assoc["by_label"][:, j, v]
                out.update(self._retrieval(a, lab, w))
        if self.ranks is not None:
            rows, i2t, t2i = self.ranks
            for direction, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
                for k in self.recall_ks:
                    out[("retrieval", direction, f"recall@{k}")] = metrics.recall_at_k(ranks, k, w[:, rows])
        return out

    def _retrieval(self, a: AttributePlan, lab: LabelPlan, w: np.ndarray) -> dict[Key, np.ndarray]:
        pool = self.pools[a.name]
        key = ("attributes", a.name, "retrieval", lab.name)
        ks = [k for k in self.ks if k <= len(pool)]
        if not len(pool):
            return {}
        skew, ndkl = metrics.ranking_skew(self.orders[(a.name, lab.name)], self.data.attributes[a.name][pool],
                                          len(a.values), w[:, pool], ks)
        out = {key + ("ndkl",): _nan_reduce(np.nanmean, ndkl), key + ("ndkl_worst",): _nan_reduce(np.nanmax, ndkl)}
        for j, k in enumerate(ks):
            out[key + ("max_skew", str(k))] = _nan_reduce(np.nanmean, skew[:, :, j])
            out[key + ("max_skew_worst", str(k))] = _nan_reduce(np.nanmax, skew[:, :, j])
        for q, value in enumerate(lab.values):
            out[key + ("by_query", value, "ndkl")] = ndkl[:, q]
            for j, k in enumerate(ks):
                out[key + ("by_query", value, "max_skew", str(k))] = skew[:, q, j]
        return out

    def info(self) -> dict:
        """The counts and choices beside the figures (no intervals)."""
        d, doc = self.data, {"attributes": {}, "labels": {}}
        for lab in self.labels:
            truth = d.labels[lab.name]
            doc["labels"][lab.name] = {
                "column": lab.column, "values": lab.values, "images": int((truth >= 0).sum()),
                "chance": 1.0 / len(lab.values), "scoring": lab.classes.scoring,
                "by_value": {v: {"images": int((truth == j).sum())} for j, v in enumerate(lab.values)},
            }
        for a in self.attributes:
            cue, pred = d.attributes[a.name], self.attr_pred[a.name]
            neutral = cue < 0
            entry = {
                "column": a.column, "values": a.values, "target": a.target, "condition": a.condition,
                "images": {"neutral": int(neutral.sum()), "cued": int((~neutral).sum()),
                           "unscored": int((neutral & (pred < 0)).sum())},
                "ab": {}, "retrieval": {},
            }
            for lab in self.labels:
                label = d.labels[lab.name]
                scored = neutral & (pred >= 0) & (label >= 0)
                entry["ab"][lab.name] = {"images": int(scored.sum()), "by_label": {
                    v: {"images": int((scored & (label == j)).sum())} for j, v in enumerate(lab.values)}}
                pool = self.pools[a.name]
                entry["retrieval"][lab.name] = {
                    "pool": {"images": int(len(pool)), "per_value": int(len(pool) // len(a.values))},
                    "k": [k for k in self.ks if k <= len(pool)], "k_skipped": self.skipped_ks(a.name),
                }
            doc["attributes"][a.name] = entry
        if self.ranks is not None:
            doc["retrieval"] = {"pairs": int(len(self.ranks[0]))}
        return doc


def _nan_reduce(fn, x: np.ndarray) -> np.ndarray:
    """``fn`` over the last axis, NaN (without a warning) where every entry is NaN."""
    empty = np.isnan(x).all(axis=-1)
    with np.errstate(invalid="ignore"):
        filled = np.where(empty[..., None], 0.0, x)
        return np.where(empty, np.nan, fn(filled, axis=-1))


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def set_path(doc: dict, key: Sequence, value) -> None:
    for part in key[:-1]:
        doc = doc.setdefault(part, {})
    doc[key[-1]] = value


def get_path(doc: dict, key: Sequence):
    for part in key:
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def estimate(evaluation: Evaluation, samples: int, confidence: float, seed: int) -> tuple[dict, dict[Key, np.ndarray]]:
    """(evaluate.json's figures merged into ``info()``, the replicates per figure)."""
    n = evaluation.data.n
    point = evaluation.figures(np.ones((1, n)))
    parts: dict[Key, list[np.ndarray]] = {k: [] for k in point}
    for w in metrics.bootstrap_weights(n, samples, seed) if samples and n else []:
        for k, v in evaluation.figures(w).items():
            parts[k].append(v)
    reps = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    doc = evaluation.info()
    for k, v in point.items():
        set_path(doc, k + ("value",), _finite(v[0]))
        set_path(doc, k + ("ci",), metrics.interval(reps[k], confidence) if _finite(v[0]) is not None else None)
    _worst(doc, evaluation)
    return doc, reps


def _worst(doc: dict, evaluation: Evaluation) -> None:
    """Name the label value behind each AB and the query behind each worst MaxSkew/NDKL."""
    for a in evaluation.attributes:
        for lab in evaluation.labels:
            ab = doc["attributes"][a.name]["ab"][lab.name]
            gaps = {v: (ab["by_label"][v].get("gap") or {}).get("value") for v in lab.values}
            gaps = {v: g for v, g in gaps.items() if g is not None}
            ab["worst_label"] = max(gaps, key=lambda v: (gaps[v], v)) if gaps else None
            ret = doc["attributes"][a.name]["retrieval"][lab.name]
            ndkl = {v: (q.get("ndkl") or {}).get("value") for v, q in (ret.get("by_query") or {}).items()}
            ndkl = {v: x for v, x in ndkl.items() if x is not None}
            ret["ndkl_worst_query"] = max(ndkl, key=lambda v: (ndkl[v], v)) if ndkl else None


def differences(base: tuple[dict, dict], other: tuple[dict, dict], confidence: float) -> dict:
    """other - base for every figure both have, nested like evaluate.json; intervals from the paired
    replicates (both evaluations resampled the same images with the same seed)."""
    (base_doc, base_reps), (doc, reps) = base, other
    out: dict = {}
    for key, rep in reps.items():
        if key not in base_reps:
            continue
        a, b = get_path(base_doc, key + ("value",)), get_path(doc, key + ("value",))
        if a is None or b is None:
            continue
        paired = rep - base_reps[key] if len(rep) == len(base_reps[key]) else np.zeros(0)
        set_path(out, key, {"value": b - a, "ci": metrics.interval(paired, confidence)})
    return out
