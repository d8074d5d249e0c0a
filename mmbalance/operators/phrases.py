"""Whole-word, case-insensitive phrase matching in captions, vectorised over a batch.

Captions and phrases are normalised alike: lower case, hyphens and underscores become spaces,
every other punctuation character becomes a token of its own, and whitespace splits tokens. A
phrase matches where its token sequence occurs in a caption: this is MetaCLIP's search for
" entry " in " caption " with whitespace and punctuation padding, so "manager" never matches "man",
"shepherd" never matches "she", and "woman's" and "Woman," match "woman". Single tokens that merely
contain a phrase ("mankind", "policewoman") do not match it.

No Python loop per caption: pyarrow tokenises and maps tokens to ids with one hash lookup, then a
trie of the phrases is walked one level at a time over all candidate positions with numpy.
``benchmarks/bench_tagging.py`` compares this with a compiled regex alternation and with polars'
Aho-Corasick. The caption lexicons (``lexicon``) and MetaCLIP's entry lists (``metaclip``) match
through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A punctuation character (not a letter, digit, combining mark, space, hyphen or underscore) is
# captured and padded with spaces; hyphens and underscores match the second branch and vanish.
_PAD_PATTERN = r"([^\p{L}\p{N}\p{M}\s_-])|[_-]"


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
        self.is_terminal = counts > 0
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
        found = [(pos[self.is_terminal[node]], 1, node[self.is_terminal[node]])]
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
            term = self.is_terminal[node]
            found.append((pos[term], k, node[term]))
            keep = self._has_child[node]
            pos, node, end = pos[keep], node[keep], end[keep]
        start = np.concatenate([f[0] for f in found]).astype(np.int64)
        length = np.concatenate([np.full(len(f[0]), f[1], np.int64) for f in found])
        nodes = np.concatenate([f[2] for f in found]).astype(np.int64)
        row = np.searchsorted(offsets, start, side="right") - 1
        return Matches(row, start, length, nodes)


def uncovered(start: np.ndarray, length: np.ndarray, group: np.ndarray, total_tokens: int) -> np.ndarray:
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
