"""M4 with a utility column in a run: each row's own baseline (streaming path), moments on the manifest."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from corpora import held_out_table, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe


def test_per_row_utility_baseline_holds_the_moments(tmp_path):
    tables = {}
    for i in range(3):
        t = held_out_table(2000, 70 + i)
        score = np.random.default_rng(i).gamma(2.0, 0.15, t.num_rows)
        tables[f"s{i}.parquet"] = t.append_column("clip_score", pa.array(score))
    corpus = write_shards(tmp_path / "c", tables)
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "utility": "clip_score"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
                    "tolerance": {"representation": 0.01, "association": 0.02}, "retention": 0.5, "max_weight": 2.0,
                    "on_infeasible": "max_retention"},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    assert "streaming" in result.report["solution"]["utility"]
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "gender", "occupation", "clip_score"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = manifest.join(truth, on="uid")
    # weights differ inside a signature, ordered by utility (per-row baselines)
    one = frame.filter((pl.col("gender") == "woman") & (pl.col("occupation") == "florist")).sort("clip_score")
    assert one["weight"].n_unique() > 10 and (np.diff(one["weight"].to_numpy()) >= -1e-12).all()
    carrying = frame.filter(pl.col("gender").is_not_null())
    W = carrying["weight"].sum()
    share = carrying.filter(pl.col("gender") == "woman")["weight"].sum() / W
    assert abs(share - 0.5) <= 0.01 + 1e-6
    for occ in carrying["occupation"].unique():
        part = carrying.filter(pl.col("occupation") == occ)
        moment = (part["weight"] * ((part["gender"] == "woman").cast(pl.Float64) - 0.5)).sum()
        assert abs(moment) <= 0.02 * W + 1e-6 * W
    assert frame["weight"].mean() == pytest.approx(result.report["solution"]["retention"], rel=1e-6)
