"""Caption coverage in the report: per caption-sourced tag, the share of captions tagged and the
most frequent untagged nouns, counted per shard and merged; checked against a direct count."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
from corpora import write_shards

from mmbalance.data import load_lines
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe

# occupations the extended vocabulary drops (so they go untagged) and ones it keeps
DROPPED = {"welder": "welder", "florist": "florist", "barista": "barista"}  # word -> its value
KEPT = ["nurse", "judge", "plumber", "surgeon"]
FILLERS = ["at work", "in the city", "with a dog", "near a river", "on the street", "under the rain"]


def _captions(n: int, seed: int) -> list[str | None]:
    rng = np.random.default_rng(seed)
    out: list[str | None] = []
    for i in range(n):
        r = rng.random()
        if r < 0.05:
            out.append(None)
        elif r < 0.45:
            out.append(f"A {rng.choice(KEPT)} {rng.choice(FILLERS)}")
        elif r < 0.8:
            word = rng.choice(list(DROPPED))
            out.append(f"the {word}s' workshop {rng.choice(FILLERS)}" if i % 4 == 0 else f"a {word} {rng.choice(FILLERS)}")
        else:
            out.append(f"Photo {i} of a kayak {rng.choice(FILLERS)}")
    return out


def _expected(captions: list[str | None]) -> tuple[int, int, Counter]:
    stop = set(load_lines("stop_words"))
    kept_words = {w for w in KEPT}
    captions_n = tagged = 0
    nouns: Counter = Counter()
    for c in captions:
        if not c:
            continue
        captions_n += 1
        words = re.findall(r"[a-z0-9]+", c.lower())
        if any(w in kept_words for w in words):
            tagged += 1
            continue
        nouns.update(w for w in words if w.isalpha() and len(w) >= 3 and w not in stop)
    return captions_n, tagged, nouns


def test_report_lists_untagged_nouns_and_tagged_share(tmp_path):
    vocab = tmp_path / "occupations.yaml"
    vocab.write_text("name: occupation\nextends: occupation\ndrop_values: [" + ", ".join(sorted(set(DROPPED.values()))) + "]\n")
    captions = _captions(1200, 0)
    table = pa.table({"uid": [f"u{i}" for i in range(len(captions))], "caption": pa.array(captions, pa.string())})
    corpus = write_shards(tmp_path / "c", {"a.parquet": table.slice(0, 500), "b/b.parquet": table.slice(500)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption"}},
        "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": str(vocab)}}],
        "report": {"leakage": False},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False))
    cov = json.loads((tmp_path / "o" / "report.json").read_text())["coverage"]["occupation"]
    captions_n, tagged, nouns = _expected(captions)
    assert (cov["captions"], cov["tagged"]) == (captions_n, tagged)
    assert cov["tagged_share"] == tagged / captions_n
    # few distinct words: the summaries hold every word, so the counts are exact
    assert cov["count_error_max"] == 0
    listed = {item["noun"]: item["count"] for item in cov["untagged_nouns"]}
    assert listed == dict(sorted(nouns.items(), key=lambda kv: (-kv[1], kv[0]))[:50])
    assert {"welder", "florist", "barista"} <= set(listed)  # what the extended vocabulary misses
    assert not set(KEPT) & set(listed)
    assert result.report["coverage"] == json.loads((tmp_path / "o" / "report.json").read_text())["coverage"]
    page = (tmp_path / "o" / "report.html").read_text()
    section = page[page.index('<section id="coverage">'):]
    section = section[: section.index("</section>")]
    for noun in ("welder", "florist", "barista"):
        assert f"<td>{noun}</td>" in section
    assert f'data-key="/coverage/occupation/tagged_share" data-value="{tagged / captions_n!r}"' in section
