"""Caption tagging from word lists (``mmbalance.data`` vocabularies): ``LexiconTagger`` gives each
attribute the value whose phrases fire in a caption (``phrases`` finds them), with negation cues
("no man") and a rule for captions where several values fire, and reports what the vocabulary
missed (``coverage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import Vocabulary, load_lines
from mmbalance.operators.coverage import COVERAGE_COUNTERS, BatchWords, StopWords, coverage_counts, default_stop_words
from mmbalance.operators.phrases import Encoded, PhraseMatcher, uncovered
from mmbalance.schemas.contract import tag_column

MultipleRule = Literal["unknown", "both", "majority"]
BOTH_SEPARATOR = "+"  # rule "both": the fired values joined in declared order, e.g. "woman+man"
CAPTION_SOURCE = "caption"


def source_tag_column(name: str, source: str) -> str:
    """The tag one source gives attribute/label ``name`` (the combined tag is ``tag.<name>``)."""
    return f"{tag_column(name)}.{source}"


def hits_column(name: str, value: str) -> str:
    """Lexicon matches of ``value`` per caption (after negation and longest-match rules)."""
    return f"hits.{name}.{value}"


@dataclass(frozen=True)
class LexiconAttribute:
    """An attribute (or label) tagged from captions: phrases per value and the multiple-values rule.

    ``multiple`` applies when several values fire in one caption ("he" and "she"): ``unknown`` gives
    null (the conservative default), ``both`` gives the fired values joined by "+" in declared
    order ("woman+man"), ``majority`` gives the value with the most matches (a tie gives null).
    """

    name: str
    values: tuple[str, ...]
    lexicon: dict[str, tuple[str, ...]]
    multiple: MultipleRule = "unknown"

    def __post_init__(self):
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"{self.name}: values must be unique")
        unknown = set(self.lexicon) - set(self.values)
        if unknown:
            raise ValueError(f"{self.name}: lexicon names values not in {list(self.values)}: {sorted(unknown)}")
        if self.multiple not in ("unknown", "both", "majority"):
            raise ValueError(f"{self.name}: multiple must be unknown, both or majority, got {self.multiple!r}")

    @classmethod
    def from_vocabulary(cls, vocab: Vocabulary, multiple: MultipleRule = "unknown", name: str | None = None):
        return cls(name or vocab.name, vocab.values, dict(vocab.lexicon), multiple)


def default_negation_cues() -> list[str]:
    return load_lines("negation_cues")


def resolve_multiple(counts: np.ndarray, values: Sequence[str], rule: MultipleRule) -> pa.Array:
    """One tag per row from per-value match counts (n, K): null when nothing fired."""
    n, k = counts.shape
    fired = counts > 0
    nfired = fired.sum(axis=1)
    idx = np.where(nfired == 1, fired.argmax(axis=1), -1)
    labels = list(values)
    if rule == "majority":
        top = counts.max(axis=1, initial=0)
        unique_top = (counts == top[:, None]).sum(axis=1) == 1
        idx = np.where((nfired > 1) & unique_top, counts.argmax(axis=1), idx)
    elif rule == "both":
        multi = np.flatnonzero(nfired > 1)
        if len(multi):
            # each distinct combination of fired values becomes one extra label
            codes = fired[multi] @ (1 << np.arange(k, dtype=np.int64)) if k < 63 else None
            if codes is None:
                raise ValueError("rule 'both' supports at most 62 values")
            combos, inverse = np.unique(codes, return_inverse=True)
            labels += [BOTH_SEPARATOR.join(v for j, v in enumerate(values) if c >> j & 1) for c in combos]
            idx[multi] = k + inverse.reshape(-1)
    index = pa.array(idx, pa.int32(), mask=idx < 0)
    return pc.take(pa.array(labels, pa.string()), index)


class LexiconTagger:
    """Tags captions with attribute values from word lists.

    Rules, in order: all occurrences of all phrases are found; within an attribute a match inside
    a longer one is dropped ("old man" is a senior, not also "man" as an adult); a match with a
    negation cue among the ``negation_window`` tokens before it is dropped ("no women", "without
    a man"); the remaining matches are counted per value, and the tag is the single value that
    fired, or the attribute's ``multiple`` rule when several did.
    """

    def __init__(
        self,
        attributes: Sequence[LexiconAttribute],
        negation_cues: Sequence[str] | None = None,
        negation_window: int = 2,
        longest_only: bool = True,
    ):
        if len({a.name for a in attributes}) != len(attributes):
            raise ValueError("attribute names must be unique")
        if negation_window < 0:
            raise ValueError("negation_window must be >= 0")
        self.attributes = list(attributes)
        self.negation_window = negation_window
        self.longest_only = longest_only
        cues = list(default_negation_cues() if negation_cues is None else negation_cues)
        phrases, owner = [], []
        for a_idx, attr in enumerate(self.attributes):
            for v_idx, value in enumerate(attr.values):
                for phrase in attr.lexicon.get(value, ()):
                    phrases.append(phrase)
                    owner.append((a_idx, v_idx))
        self.matcher = PhraseMatcher(phrases, extra_tokens=cues)
        # node -> distinct (attribute, value) pairs; one phrase under two values of one attribute is
        # a lexicon error (it would make that attribute always ambiguous)
        per_node: dict[int, dict[int, int]] = {}
        for node in np.flatnonzero(self.matcher.is_terminal):
            lo, hi = self.matcher.terminal_offsets[node], self.matcher.terminal_offsets[node + 1]
            seen: dict[int, int] = {}
            for p in self.matcher.terminal_phrases[lo:hi]:
                a_idx, v_idx = owner[p]
                if seen.setdefault(a_idx, v_idx) != v_idx:
                    attr = self.attributes[a_idx]
                    raise ValueError(
                        f"{attr.name}: phrase {phrases[p]!r} is listed under both "
                        f"{attr.values[seen[a_idx]]!r} and {attr.values[v_idx]!r}"
                    )
            per_node[int(node)] = seen
        counts = np.zeros(self.matcher.num_nodes, np.int64)
        for node, seen in per_node.items():
            counts[node] = len(seen)
        self._label_offsets = np.zeros(self.matcher.num_nodes + 1, np.int64)
        np.cumsum(counts, out=self._label_offsets[1:])
        self._label_attr = np.zeros(self._label_offsets[-1], np.int64)
        self._label_value = np.zeros(self._label_offsets[-1], np.int64)
        for node, seen in per_node.items():
            lo = self._label_offsets[node]
            self._label_attr[lo : lo + len(seen)] = list(seen)
            self._label_value[lo : lo + len(seen)] = list(seen.values())
        self._is_cue = np.zeros(self.matcher.vocab_size, bool)
        for cue in cues:
            tid = self.matcher.token_id(cue.strip().lower())
            if tid >= 0:
                self._is_cue[tid] = True

    @classmethod
    def from_vocabularies(cls, vocabularies: Iterable[Vocabulary], multiple: MultipleRule = "unknown", **kwargs):
        return cls([LexiconAttribute.from_vocabulary(v, multiple) for v in vocabularies], **kwargs)

    def _kept(self, enc: Encoded) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(start, length, attribute) of every phrase match, and per kept match its row, attribute
        and value (a phrase in two attributes' lexicons gives one match per attribute)."""
        m = self.matcher.find(enc)
        # one row per (match, attribute/value the phrase belongs to)
        lo, hi = self._label_offsets[m.node], self._label_offsets[m.node + 1]
        reps = hi - lo
        which = np.repeat(np.arange(len(reps)), reps)
        label = np.repeat(lo - np.concatenate([[0], np.cumsum(reps)[:-1]]), reps) + np.arange(reps.sum())
        row, start, length = m.row[which], m.start[which], m.length[which]
        attr, value = self._label_attr[label], self._label_value[label]
        keep = np.ones(len(row), bool)
        if self.longest_only:
            keep &= uncovered(start, length, attr, len(enc.ids))
        if self.negation_window and self._is_cue.any():
            cue = np.zeros(len(enc.ids) + 1, np.int64)
            known = enc.ids >= 0
            cue[1:][known] = self._is_cue[enc.ids[known]]
            before = np.cumsum(cue)  # before[p] = cues among tokens [0, p)
            window_start = np.maximum(start - self.negation_window, enc.offsets[row])
            keep &= (before[start] - before[window_start]) == 0
        return (start, length, attr), row[keep], attr[keep], value[keep]

    def _per_attribute(self, row, attr, value, n: int):
        for a_idx, a in enumerate(self.attributes):
            sel = attr == a_idx
            yield a, row[sel], value[sel]

    def counts(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> dict[str, np.ndarray]:
        """Per attribute, an (n, K) int32 matrix of matches per caption and value."""
        enc = self.matcher.encode(captions)
        _, row, attr, value = self._kept(enc)
        n = enc.num_rows
        return {a.name: _dense_counts(r, v, n, len(a.values)) for a, r, v in self._per_attribute(row, attr, value, n)}

    def tag(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None], source: str = CAPTION_SOURCE,
            hits: bool = True) -> pa.Table:
        """Per attribute: the tag column (``tag.<name>.<source>``) and, with ``hits``, one hits column per value."""
        return self.tag_with_coverage(captions, source, hits, coverage=False)[0]

    def tag_with_coverage(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None], source: str = CAPTION_SOURCE,
                          hits: bool = False, coverage: bool = True, stop_words: "StopWords | None" = None,
                          counters: int = COVERAGE_COUNTERS) -> tuple[pa.Table, dict[str, dict]]:
        """``tag`` plus, per attribute, what the vocabulary missed (``coverage_counts``): captions,
        captions tagged, and a Misra-Gries summary of the words of untagged captions."""
        enc = self.matcher.encode(captions, words=coverage)
        (start, length, found_attr), row, attr, value = self._kept(enc)
        n = enc.num_rows
        data: dict[str, pa.Array] = {}
        cover: dict[str, dict] = {}
        words = BatchWords.of(enc, stop_words or default_stop_words()) if coverage else None
        for a_idx, (a, r, v) in enumerate(self._per_attribute(row, attr, value, n)):
            tag = resolve_sparse(r, v, n, a.values, a.multiple)
            data[source_tag_column(a.name, source)] = tag
            if hits:
                counts = _dense_counts(r, v, n, len(a.values))
                for j, name in enumerate(a.values):
                    data[hits_column(a.name, name)] = pa.array(counts[:, j], pa.int32())
            if coverage:
                found = found_attr == a_idx
                cover[a.name] = coverage_counts(enc, tag, start[found], length[found], words, counters)
        return pa.table(data), cover


def _dense_counts(row: np.ndarray, value: np.ndarray, n: int, k: int) -> np.ndarray:
    out = np.zeros(n * k, np.int32)
    if len(row):
        keys, c = np.unique(row * k + value, return_counts=True)
        out[keys] = c
    return out.reshape(n, k)


def resolve_sparse(row: np.ndarray, value: np.ndarray, n: int, values: Sequence[str], rule: MultipleRule) -> pa.Array:
    """``resolve_multiple`` from the kept matches (row, value index) without a dense (n, K) matrix:
    rows where one value fired take it; rows where several did go through the rule."""
    k = len(values)
    idx = np.full(n, -1, np.int64)
    multi = np.zeros(0, np.int64)
    if len(row):
        keys = np.unique(row * k + value)
        r, v = keys // k, keys % k
        first = np.r_[True, r[1:] != r[:-1]]
        nfired = np.diff(np.r_[np.flatnonzero(first), len(r)])
        rows = r[first]
        single = nfired == 1
        idx[rows[single]] = v[first][single]
        multi = rows[~single]
    base = pc.take(pa.array(list(values), pa.string()), pa.array(idx, pa.int32(), mask=idx < 0))
    if len(row) and len(multi) and rule != "unknown":
        sel = np.isin(row, multi)
        resolved = resolve_multiple(_dense_counts(np.searchsorted(multi, row[sel]), value[sel], len(multi), k), values, rule)
        order = np.arange(n)
        order[multi] = n + np.arange(len(multi))
        return pc.take(pa.concat_arrays([base, resolved]), pa.array(order))
    return base
