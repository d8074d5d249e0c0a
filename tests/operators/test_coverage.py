"""Coverage of a caption vocabulary: captions tagged and the words of untagged captions, as
Misra-Gries summaries per batch merged across batches/shards; checked against direct counts."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa

from mmbalance.data import load_lines
from mmbalance.operators.coverage import coverage_report, merge_coverage, misra_gries
from mmbalance.operators.lexicon import LexiconAttribute, LexiconTagger, source_tag_column

STOP = set(load_lines("stop_words"))


def _tagger() -> LexiconTagger:
    return LexiconTagger([LexiconAttribute("pet", ("cat", "dog"), {"cat": ("cat", "cats", "tabby cat"), "dog": ("dog", "dogs")})])


def _exact(captions, tags) -> Counter:
    out: Counter = Counter()
    for c, t in zip(captions, tags):
        if c and t is None:
            out.update(w for w in re.findall(r"[^\W\d_]+|\d+|[^\w\s]", c.lower())
                       if w.isalpha() and len(w) >= 3 and w not in STOP and w not in ("cat", "cats", "dog", "dogs"))
    return out


def _captions(n: int, seed: int, vocab_size: int) -> list[str | None]:
    rng = np.random.default_rng(seed)
    words = [f"w{chr(97 + i % 26)}{chr(97 + (i // 26) % 26)}{chr(97 + (i // 676) % 26)}" for i in range(vocab_size)]
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    p /= p.sum()
    lengths = rng.integers(3, 9, n)
    drawn = np.array(words, dtype=object)[rng.choice(vocab_size, size=lengths.sum(), p=p)].tolist()
    pets = rng.choice(["a cat", "dogs", "the tabby cat", "no cat"], n).tolist()
    ends = rng.choice(["the", "of", "photo", "42", "it's", "x"], n).tolist()
    out: list[str | None] = []
    pos = 0
    for i in range(n):
        ws, pos = drawn[pos : pos + lengths[i]], pos + lengths[i]
        if i % 50 == 0:
            out.append(None if i % 100 == 0 else "  ")
            continue
        if i % 5 < 2:
            ws.insert(i % len(ws), pets[i])
        out.append(" ".join(ws + [ends[i]]))
    return out


def test_batch_coverage_is_exact_below_the_counter_budget():
    captions = _captions(2000, 0, 60)
    table, cover = _tagger().tag_with_coverage(pa.array(captions))
    tags = table.column(source_tag_column("pet", "caption")).to_pylist()
    c = cover["pet"]
    assert c["captions"] == sum(bool(x and x.strip()) for x in captions) and c["rows"] == len(captions)
    assert c["tagged"] == sum(t is not None for t in tags)
    assert c["error"] == 0 and c["words"] == dict(_exact(captions, tags))
    # "no cat" is negated (untagged) but "cat" is the vocabulary's word: never listed as missed
    assert "cat" not in c["words"] and "photo" not in c["words"] and "the" not in c["words"]


def test_merged_summaries_bound_every_count():
    captions = _captions(6000, 1, 3000)
    tagger = _tagger()
    merged, tags = None, []
    for lo in range(0, len(captions), 700):  # batches, then shards merged in another order
        table, cover = tagger.tag_with_coverage(pa.array(captions[lo:lo + 700]), counters=64)
        tags += table.column(source_tag_column("pet", "caption")).to_pylist()
        merged = merge_coverage(cover["pet"], merged, counters=64) if merged else cover["pet"]
    exact = _exact(captions, tags)
    error = merged["error"]
    assert 0 < error <= (sum(exact.values()) - sum(merged["words"].values())) / 65
    for word, count in exact.items():  # Misra-Gries: lower bounds within the error; frequent words kept
        got = merged["words"].get(word, 0)
        assert count - error <= got <= count
        if count > error:
            assert word in merged["words"]
    report = coverage_report(merged, top=10)
    assert [x["noun"] for x in report["untagged_nouns"][:3]] == [w for w, _ in exact.most_common(3)]
    assert report["tagged_share"] == merged["tagged"] / merged["captions"] and report["count_error_max"] == error


def test_misra_gries_reduction():
    assert misra_gries({"a": 5, "b": 3, "c": 1}, 5) == {"words": {"a": 5, "b": 3, "c": 1}, "error": 0}
    assert misra_gries({"a": 5, "b": 3, "c": 1, "d": 1}, 2) == {"words": {"a": 4, "b": 2}, "error": 1}
    assert misra_gries({"a": 2, "b": 2, "c": 2}, 2, error=3) == {"words": {}, "error": 5}
