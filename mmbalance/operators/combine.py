"""Combining an attribute's tag sources (zero-shot image/text, caption lexicon, a given column) into
one tag by the recipe's rule, with the bitmask of the sources that fired. Every tagger's output
goes through it: the scan's (``tag``) and the assign step's (``assign``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import NONE_VALUE
from mmbalance.operators.lexicon import BOTH_SEPARATOR
from mmbalance.operators.zero_shot import hard_tags

CombineRule = Literal["any", "all", "image", "text", "vote", "mean"]
COMBINE_RULES = ("any", "all", "image", "text", "vote", "mean")


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
