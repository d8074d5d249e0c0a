"""MetaCLIP balancing over metadata entries, end to end, against a brute-force reference."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from corpora import write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import RecipeError, parse_recipe

ENTRIES = ["dog", "cat", "red car", "car", "new york", "tree"]


def _captions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["a dog", "the cat", "a red car", "an old car", "in new york", "under a tree", "a person", "a lamp"]
    p = np.array([0.35, 0.2, 0.05, 0.1, 0.05, 0.05, 0.1, 0.1])
    return [" and ".join(rng.choice(words, size=rng.integers(1, 3), p=p)) + "." for _ in range(n)]


def test_cap_over_metadata_entries_matches_metaclip(tmp_path):
    captions = _captions(3000, 1)
    table = pa.table({"uid": [f"m{i}" for i in range(3000)], "caption": captions})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 1700), "b.parquet": table.slice(1700)})
    (tmp_path / "entries.txt").write_text("\n".join(ENTRIES) + "\n")
    cap = 200
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption"}},
        "labels": [{"name": "concept", "source": "metadata", "metadata": {"entries": str(tmp_path / "entries.txt")}}],
        "balance": {"method": "cap", "by": "concept", "cap": cap},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))

    # brute force: whole-word matches, every entry that occurs (MetaCLIP counts "car" inside "red car" too)
    matched = [[e for e in ENTRIES if re.search(rf"\b{re.escape(e)}\b", c.lower())] for c in captions]
    counts = {e: sum(e in m for m in matched) for e in ENTRIES}
    p = {e: cap / max(counts[e], cap) for e in ENTRIES}
    expected = np.array([1.0 - np.prod([1 - p[e] for e in m]) if m else 1.0 for m in matched])

    manifest = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    weights = dict(zip(manifest["uid"], manifest["weight"]))
    got = np.array([weights[f"m{i}"] for i in range(3000)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    diag = result.report["solution"]
    assert diag["values_capped"] == sum(c > cap for c in counts.values())
    assert {ENTRIES[int(k)]: v for k, v in diag["largest_counts"].items()} == {e: c for e, c in counts.items() if c > cap}
    before = result.report["before"]["concept_balance"]["concept"]
    after = result.report["after_expected"]["concept_balance"]["concept"]
    assert before["largest"] == max(counts.values()) and after["gini"] < before["gini"]


def test_metadata_labels_only_take_a_single_cap():
    base = {"input": {"columns": {"caption": "caption"}},
            "labels": [{"name": "concept", "source": "metadata", "metadata": {"entries": "x.txt"}}]}
    with pytest.raises(RecipeError, match="only a single cap step balances metadata entries"):
        parse_recipe({**base, "balance": {"method": "waterfill", "by": "concept", "size": 10}})
    with pytest.raises(RecipeError, match="not attributes"):
        parse_recipe({**base, "attributes": [{"name": "g", "source": "metadata", "values": ["a"], "metadata": {"entries": "x"}}]})
