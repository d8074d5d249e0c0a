"""Composed balance steps through the one solve interface: water-fill over a label, then M4."""

from __future__ import annotations

import polars as pl
import pytest
from corpora import held_out_table, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe


def test_waterfill_then_m4_holds_both(tmp_path):
    corpus = write_shards(tmp_path / "c", {f"s{i}.parquet": held_out_table(4000, 40 + i) for i in range(3)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation"}],
        "balance": [
            {"method": "waterfill", "by": "occupation", "retention": 0.6},
            {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": [["gender", "occupation"]],
             "tolerance": {"representation": 0.01, "association": 0.02}, "retention": 0.6, "max_weight": 1.0},
        ],
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "gender", "occupation"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = manifest.join(truth, on="uid")
    steps = result.report["solution"]["steps"]
    assert [s["method"] for s in steps] == ["waterfill", "m4"]
    # retention multiplies: 0.6 after water-filling, then 0.6 of that
    assert frame["weight"].sum() / frame.height == pytest.approx(0.6 * 0.6, rel=1e-6)
    assert result.report["method"] == "waterfill+m4"
    # M4 holds on the final weights: representation among rows with a gender, association per occupation
    carrying = frame.filter(pl.col("gender").is_not_null())
    total = carrying["weight"].sum()
    woman = carrying.filter(pl.col("gender") == "woman")["weight"].sum()
    assert abs(woman - 0.5 * total) <= 0.01 * total + 1e-6 * total
    for occ in carrying["occupation"].unique():
        in_occ = carrying.filter(pl.col("occupation") == occ)
        moment = (in_occ["weight"] * ((in_occ["gender"] == "woman").cast(pl.Float64) - 0.5)).sum()
        assert abs(moment) <= 0.02 * total + 1e-6 * total


def test_infeasible_m4_is_a_one_line_input_error(tmp_path):
    from mmbalance.schemas.contract import InputError

    corpus = write_shards(tmp_path / "c", {"s.parquet": held_out_table(3000, 7)})
    recipe = parse_recipe({
        "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
        "balance": {"method": "m4", "associate": [["gender", "occupation"]], "tolerance": {"association": 0.0},
                    "targets": {"gender": {"woman": 0.9, "man": 0.1}}, "retention": 0.95},
    })
    with pytest.raises(InputError, match=r"^solve: balance.retention 0.95 is infeasible .*largest feasible retention") as err:
        rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    assert "\n" not in str(err.value)
