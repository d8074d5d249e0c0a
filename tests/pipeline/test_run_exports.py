"""A run writes the recipe's trainer formats at its end, with clusters as domains."""

from __future__ import annotations

import json

import numpy as np

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import synth_corpus


def test_run_exports_webdataset_and_csv_by_cluster(tmp_path):
    corpus = tmp_path / "corpus"
    synth_corpus(corpus, rows=1200, shards=2, seed=1, dim=16, images=True)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption", "image": "image", "image_embedding": "image_emb"}},
        "clusters": [{"name": "concept", "k": 4}],
        "sample": {"size": 800},
        "balance": {"method": "cap", "by": "concept", "cap": 200},
        "export": {"formats": ["parquet", "csv", "webdataset", "datacomp"], "domain": {"by": "concept"}},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    export = tmp_path / "o" / "export"
    mixture = json.loads((export / "mixture.json").read_text())
    assert sorted(mixture["domains"]) == ["0", "1", "2", "3"]  # one domain per cluster
    assert sum(d["repeats"] for d in mixture["domains"].values()) == result.report["weights"]["realized_rows"]
    tsv = (export / "csv" / "train.tsv").read_text().splitlines()
    assert len(tsv) - 1 == result.report["weights"]["realized_rows"]  # one line per repeat
    assert list((export / "webdataset").rglob("*.tar")) and (export / "webdataset" / "open_clip.json").exists()
    assert "export" in result.report["stage_seconds"]
    uids = np.load(next((export / "datacomp").glob("*.npy")))
    assert len(uids) == result.report["weights"]["realized_rows"]  # each uid listed `repeats` times
