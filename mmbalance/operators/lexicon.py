"""Caption tagging from word lists, and MetaCLIP-style metadata matching.

Matching is whole-word and case-insensitive. Captions and phrases are normalised alike: lower case,
hyphens and underscores become spaces, every other punctuation character becomes a token of its
own, and whitespace splits tokens. A phrase matches where its token sequence occurs in a caption:
this is MetaCLIP's search for " entry " in " caption " with whitespace and punctuation padding, so
"manager" never matches "man", "shepherd" never matches "she", and "woman's" and "Woman," match
"woman". Single tokens that merely contain a phrase ("mankind", "policewoman") do not match it.

Everything is vectorised over a batch (no Python loop per caption): pyarrow tokenises and maps
tokens to ids with one hash lookup, then a trie of the phrases is walked one level at a time over
all candidate positions with numpy. ``benchmarks/bench_tagging.py`` compares this with a compiled
regex alternation and with polars' Aho-Corasick.

Two operators:
- ``LexiconTagger``: attribute values from word lists (``mmbalance.data`` vocabularies), with
  negation cues ("no man") and a rule for captions where several values fire.
- ``MetadataMatcher``: a user's entry list (one per line) -> multi-hot entry ids per caption, for
  MetaCLIP's per-entry cap (``operators/metaclip.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import Vocabulary, load_lines
from mmbalance.schemas.contract import tag_column

MultipleRule = Literal["unknown", "both", "majority"]
BOTH_SEPARATOR = "+"  # rule "both": the fired values joined in declared order, e.g. "woman+man"
CAPTION_SOURCE = "caption"
COVERAGE_COUNTERS = 256  # Misra-Gries counters per coverage summary (batch, shard, run)
MIN_WORD_LETTERS = 3  # shorter words are left out of the untagged-nouns list

# A punctuation character (not a letter, digit, combining mark, space, hyphen or underscore) is
# captured and padded with spaces; hyphens and underscores match the second branch and vanish.
_PAD_PATTERN = r"([^\p{L}\p{N}\p{M}\s_-])|[_-]"


def source_tag_column(name: str, source: str) -> str:
    """The tag one source gives attribute/label ``name`` (the combined tag is ``tag.<name>``)."""
    return f"{tag_column(name)}.{source}"


def hits_column(name: str, value: str) -> str:
    """Lexicon matches of ``value`` per caption (after negation and longest-match rules)."""
    return f"hits.{name}.{value}"




# ---------------------------------------------------------------------------------------------
# Tokenising


@dataclass
class Tokens:
    """Tokenised captions: flat token strings and per-caption offsets (``offsets[i]:offsets[i+1]``)."""

    tokens: pa.Array
    offsets: np.ndarray  # int64, length n + 1

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1


def _as_array(values: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.string())
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    return values


def normalise(captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.Array:
    """Lower case, hyphens/underscores to spaces, punctuation padded with spaces (nulls stay null)."""
    return pc.replace_substring_regex(pc.utf8_lower(_as_array(captions)), _PAD_PATTERN, r" \1 ")


def tokenize(captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> Tokens:
    """Split normalised captions into tokens; a null caption has no tokens."""
    lists = pc.utf8_split_whitespace(normalise(captions))
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokens(pc.list_flatten(lists), offsets)


# ---------------------------------------------------------------------------------------------
# Phrase matching


@dataclass
class Matches:
    """One row per phrase occurrence: caption row, first token (global index), length, trie node."""

    row: np.ndarray
    start: np.ndarray
    length: np.ndarray
    node: np.ndarray

    def take(self, keep: np.ndarray) -> "Matches":
        return Matches(self.row[keep], self.start[keep], self.length[keep], self.node[keep])


@dataclass
class Encoded:
    """Token ids of a batch (-1 = a token no phrase uses) with per-caption offsets."""

    ids: np.ndarray  # int32 per token
    offsets: np.ndarray  # int64, n + 1
    tokens: pa.Array | None = None  # the token strings
    # with ``encode(..., words=True)``: each token's index into ``words``, the batch's distinct tokens
    codes: np.ndarray | None = None
    words: pa.Array | None = None

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1


class PhraseMatcher:
    """Finds every occurrence of a set of phrases (token sequences) in tokenised captions.

    The phrases form a trie over token ids: a node of depth 1 is the token id itself, deeper nodes
    are numbered after the vocabulary. ``find`` starts at every token position that is in the
    vocabulary and extends all candidates one token per step, so the work is one hash lookup per
    token plus a few binary searches per surviving candidate, whatever the number of phrases.
    """

    def __init__(self, phrases: Sequence[str], extra_tokens: Sequence[str] = ()):
        toks = tokenize(pa.array(list(phrases), pa.string()))
        flat = toks.tokens.to_pylist()
        vocab: dict[str, int] = {}
        # utf8_split_whitespace yields "" at the edges of a padded string: never a token to match
        for t in flat:
            if t:
                vocab.setdefault(t, len(vocab))
        for t in extra_tokens:
            for part in tokenize([t]).tokens.to_pylist():
                if part:
                    vocab.setdefault(part, len(vocab))
        self.vocab_size = v = max(len(vocab), 1)
        edges: dict[tuple[int, int], int] = {}
        terminal: dict[int, list[int]] = {}
        self.phrase_tokens: list[tuple[str, ...]] = []
        for i in range(len(phrases)):
            seq = [t for t in flat[toks.offsets[i] : toks.offsets[i + 1]] if t]
            self.phrase_tokens.append(tuple(seq))
            if not seq:
                continue  # blank phrase: nothing to match
            node = vocab[seq[0]]
            for t in seq[1:]:
                node = edges.setdefault((node, vocab[t]), v + len(edges))
            terminal.setdefault(node, []).append(i)
        self.num_nodes = v + len(edges)
        self.tokens = pa.array(list(vocab), pa.string())
        self._token_id = vocab
        keys = np.array([p * v + t for p, t in edges], np.int64)
        children = np.array(list(edges.values()), np.int64)
        order = np.argsort(keys)
        self._edge_keys, self._edge_child = keys[order], children[order]
        self._has_child = np.zeros(self.num_nodes, bool)
        self._has_child[np.array([p for p, _ in edges], np.int64)] = True
        counts = np.zeros(self.num_nodes, np.int64)
        for node, ids in terminal.items():
            counts[node] = len(ids)
        self.terminal_offsets = np.zeros(self.num_nodes + 1, np.int64)
        np.cumsum(counts, out=self.terminal_offsets[1:])
        self.terminal_phrases = np.zeros(self.terminal_offsets[-1], np.int64)
        for node, ids in terminal.items():
            self.terminal_phrases[self.terminal_offsets[node] : self.terminal_offsets[node + 1]] = ids
        self._is_terminal = counts > 0
        self.max_length = max((len(s) for s in self.phrase_tokens), default=0)

    def token_id(self, token: str) -> int:
        return self._token_id.get(token, -1)

    def encode(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None], words: bool = False) -> Encoded:
        """Token ids; with ``words`` also the batch's distinct tokens, found by one dictionary
        encoding whose (small) dictionary is then looked up, instead of a lookup per token."""
        toks = tokenize(captions)
        value_set = self.tokens if pa.types.is_string(toks.tokens.type) else pc.cast(self.tokens, toks.tokens.type)
        if not words:
            ids = pc.fill_null(pc.index_in(toks.tokens, value_set=value_set), -1)
            return Encoded(ids.to_numpy(zero_copy_only=False).astype(np.int32, copy=False), toks.offsets, toks.tokens)
        encoded = pc.dictionary_encode(toks.tokens)
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        word_ids = pc.fill_null(pc.index_in(encoded.dictionary, value_set=value_set), -1).to_numpy(zero_copy_only=False)
        ids = word_ids.astype(np.int32)[codes] if len(codes) else np.zeros(0, np.int32)
        return Encoded(ids, toks.offsets, toks.tokens, codes, encoded.dictionary)

    def find(self, enc: Encoded) -> Matches:
        ids, offsets = enc.ids, enc.offsets
        pos = np.flatnonzero(ids >= 0)
        node = ids[pos].astype(np.int64)
        found = [(pos[self._is_terminal[node]], 1, node[self._is_terminal[node]])]
        keep = self._has_child[node]
        pos, node = pos[keep], node[keep]
        # a phrase never crosses captions: the end of each candidate's caption bounds its extension
        end = offsets[np.searchsorted(offsets, pos, side="right")] if len(pos) else pos
        k = 1
        while len(pos):
            nxt = pos + k
            ok = nxt < end
            pos, node, end, nxt = pos[ok], node[ok], end[ok], nxt[ok]
            t = ids[nxt].astype(np.int64)
            ok = t >= 0
            key = node[ok] * self.vocab_size + t[ok]
            pos, end = pos[ok], end[ok]
            idx = np.minimum(np.searchsorted(self._edge_keys, key), len(self._edge_keys) - 1)
            hit = self._edge_keys[idx] == key if len(self._edge_keys) else np.zeros(len(key), bool)
            pos, end, node = pos[hit], end[hit], self._edge_child[idx[hit]]
            k += 1
            term = self._is_terminal[node]
            found.append((pos[term], k, node[term]))
            keep = self._has_child[node]
            pos, node, end = pos[keep], node[keep], end[keep]
        start = np.concatenate([f[0] for f in found]).astype(np.int64)
        length = np.concatenate([np.full(len(f[0]), f[1], np.int64) for f in found])
        nodes = np.concatenate([f[2] for f in found]).astype(np.int64)
        row = np.searchsorted(offsets, start, side="right") - 1
        return Matches(row, start, length, nodes)


def _uncovered(start: np.ndarray, length: np.ndarray, group: np.ndarray, total_tokens: int) -> np.ndarray:
    """Mask of matches not inside a longer match of the same group ("old man" hides "man").

    Spans are shifted by group so groups never overlap; sorted by (start, longer first), a span is
    covered exactly when an earlier span reaches at least as far.
    """
    if len(start) == 0:
        return np.zeros(0, bool)
    s = start + group.astype(np.int64) * (total_tokens + 1)
    e = s + length
    order = np.lexsort((-length, s))
    e_sorted = e[order]
    reach = np.maximum.accumulate(e_sorted)
    prev = np.concatenate([[-1], reach[:-1]])
    keep = np.empty(len(s), bool)
    keep[order] = prev < e_sorted
    return keep


# ---------------------------------------------------------------------------------------------
# Lexicon tagger


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
        for node in np.flatnonzero(self.matcher._is_terminal):
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
            keep &= _uncovered(start, length, attr, len(enc.ids))
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


# ---------------------------------------------------------------------------------------------
# Coverage: what a vocabulary misses



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


# ---------------------------------------------------------------------------------------------
# Metadata matcher (MetaCLIP)


class MetadataMatcher:
    """A user's entry list matched in captions: multi-hot entry ids per caption, counts per shard.

    Entry ids are 0-based positions in the list (blank lines skipped by ``from_file``). As in
    MetaCLIP every occurrence counts, including entries inside longer ones ("new york" and "york"
    in "new york city") unless ``longest_only``. Entries that normalise alike ("t-shirt",
    "t shirt") all fire together.
    """

    def __init__(self, entries: Sequence[str], longest_only: bool = False):
        self.entries = list(entries)
        self.longest_only = longest_only
        self.matcher = PhraseMatcher(self.entries)

    @classmethod
    def from_file(cls, path, longest_only: bool = False) -> "MetadataMatcher":
        return cls(load_lines(path), longest_only)

    @property
    def num_entries(self) -> int:
        return len(self.entries)

    def match(self, captions: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> pa.ListArray:
        """list<int32> per caption: the distinct entry ids it matches, ascending (empty if none)."""
        enc = self.matcher.encode(captions)
        m = self.matcher.find(enc)
        if self.longest_only:
            m = m.take(_uncovered(m.start, m.length, np.zeros(len(m.start), np.int64), len(enc.ids)))
        t_off, t_ids = self.matcher.terminal_offsets, self.matcher.terminal_phrases
        lo, hi = t_off[m.node], t_off[m.node + 1]
        reps = hi - lo
        row = np.repeat(m.row, reps)
        entry = t_ids[np.repeat(lo - np.concatenate([[0], np.cumsum(reps)[:-1]]), reps) + np.arange(reps.sum())]
        pairs = np.unique(row * max(self.num_entries, 1) + entry)
        n = enc.num_rows
        rows = pairs // max(self.num_entries, 1)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        values = (pairs % max(self.num_entries, 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
