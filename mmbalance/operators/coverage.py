"""Coverage of a caption vocabulary: captions tagged, and the words of untagged captions no phrase
covers, as Misra-Gries summaries per batch that merge across batches and shards (the report's
most frequent untagged nouns: what the vocabulary may miss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import load_lines
from mmbalance.operators.phrases import Encoded

COVERAGE_COUNTERS = 256  # Misra-Gries counters per coverage summary (batch, shard, run)
MIN_WORD_LETTERS = 3  # shorter words are left out of the untagged-nouns list


class StopWords:
    """A word set as an Arrow value set (for ``pc.is_in`` over a batch's tokens)."""

    def __init__(self, words: Iterable[str]):
        self.words = pa.array(sorted({w.strip().lower() for w in words if w.strip()}), pa.string())


_STOP_WORDS: StopWords | None = None


def default_stop_words() -> StopWords:
    global _STOP_WORDS
    if _STOP_WORDS is None:
        _STOP_WORDS = StopWords(load_lines("stop_words"))
    return _STOP_WORDS


def misra_gries(counts: dict[str, int], counters: int, error: int = 0) -> dict:
    """Reduce word counts to at most ``counters`` entries: every count is lowered by the
    (counters + 1)-th largest (Misra-Gries); the summary's ``error`` grows by that amount and
    bounds how far each stored count is below the true one."""
    if len(counts) <= counters:
        return {"words": dict(counts), "error": error}
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    cut = ordered[counters][1]
    return {"words": {w: c - cut for w, c in ordered[:counters] if c > cut}, "error": error + cut}


@dataclass
class BatchWords:
    """A batch's tokens as ids into its distinct words, and which distinct words may be listed
    (not stop words, letters only, long enough): the filters run once per distinct word."""

    ids: np.ndarray  # int64 per token, into ``words``
    words: pa.Array
    eligible: np.ndarray  # bool per distinct word
    nonempty: np.ndarray  # bool per distinct word ("" comes from splitting padded text)

    @classmethod
    def of(cls, enc: Encoded, stop_words: StopWords) -> "BatchWords":
        if enc.codes is None:
            encoded = pc.dictionary_encode(enc.tokens)
            codes, words = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), encoded.dictionary
        else:
            codes, words = enc.codes, enc.words
        length = pc.utf8_length(words)
        eligible = pc.and_(pc.and_(pc.invert(pc.is_in(words, value_set=stop_words.words)), pc.utf8_is_alpha(words)),
                           pc.greater_equal(length, MIN_WORD_LETTERS))
        return cls(codes, words, eligible.to_numpy(zero_copy_only=False), pc.greater(length, 0).to_numpy(zero_copy_only=False))


def coverage_counts(enc: Encoded, tags: pa.Array, match_start: np.ndarray, match_length: np.ndarray,
                    words: BatchWords, counters: int = COVERAGE_COUNTERS) -> dict:
    """One batch's coverage of one attribute: captions (with a word), captions tagged, and the
    words of untagged captions that no phrase of the attribute covers (stop words, words with
    non-letters or under 3 letters left out) as a Misra-Gries summary (``merge_coverage``)."""
    lengths = np.diff(enc.offsets)
    untagged = tags.is_null().to_numpy(zero_copy_only=False)
    # splitting a blank or padded caption yields empty tokens: a caption is one with a real token
    empty_words = np.flatnonzero(~words.nonempty)  # at most one: ""
    empty = np.flatnonzero(words.ids == empty_words[0]) if len(empty_words) else np.zeros(0, np.int64)
    empties = np.bincount(np.searchsorted(enc.offsets, empty, side="right") - 1, minlength=len(lengths))
    has_words = lengths - empties[: len(lengths)] > 0
    covered = np.zeros(len(enc.ids) + 1, np.int64)
    if len(match_start):  # +1 at each match start, -1 after its end: positive inside a match
        np.add.at(covered, match_start, 1)
        np.add.at(covered, match_start + match_length, -1)
    mask = np.repeat(untagged & has_words, lengths) & (np.cumsum(covered[:-1]) == 0)
    ids = words.ids[mask]
    counts = np.bincount(ids[words.eligible[ids]], minlength=len(words.words))
    nonzero = np.flatnonzero(counts)
    error = 0
    if len(nonzero) > counters:  # Misra-Gries on the batch: keep the top counters, lowered by the next
        top = nonzero[np.argpartition(-counts[nonzero], counters)[: counters + 1]]
        top = top[np.lexsort((top, -counts[top]))]
        error = int(counts[top[-1]])
        nonzero = top[:-1][counts[top[:-1]] > error]
    found = dict(zip(words.words.take(pa.array(nonzero)).to_pylist(), (counts[nonzero] - error).tolist()))
    return {"captions": int(has_words.sum()), "tagged": int((has_words & ~untagged).sum()), "rows": len(lengths),
            "words": found, "error": error}


def merge_coverage(a: dict | None, b: dict, counters: int = COVERAGE_COUNTERS) -> dict:
    """Merge two coverage summaries (batches or shards): counts add, the word summaries add and are
    reduced again (Misra-Gries summaries are mergeable with the errors adding)."""
    if a is None:
        return b
    words = dict(a["words"])
    for w, c in b["words"].items():
        words[w] = words.get(w, 0) + c
    summary = misra_gries(words, counters, a["error"] + b["error"])
    return {"captions": a["captions"] + b["captions"], "tagged": a["tagged"] + b["tagged"], "rows": a["rows"] + b["rows"],
            "words": summary["words"], "error": summary["error"]}


def coverage_report(summary: dict, top: int = 50) -> dict:
    """The report's view: share of captions tagged and the ``top`` most frequent untagged words."""
    words = sorted(summary["words"].items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "captions": summary["captions"],
        "tagged": summary["tagged"],
        "tagged_share": summary["tagged"] / summary["captions"] if summary["captions"] else 0.0,
        "untagged_nouns": [{"noun": w, "count": c} for w, c in words],
        "count_error_max": summary["error"],
        "method": (f"words of untagged captions not matched by the vocabulary, not stop words, letters only, "
                   f">= {MIN_WORD_LETTERS} letters; occurrences, Misra-Gries summary of {COVERAGE_COUNTERS} counters per "
                   f"shard merged across shards: each count is a lower bound, at most count_error_max below the true count"),
    }
