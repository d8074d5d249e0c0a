"""The report's M4 constraint families, recomputed from the manifest joined with the input's own tags."""

from __future__ import annotations

import html
import re

import numpy as np
import polars as pl
import pyarrow as pa
from corpora import held_out_table, write_shards

from mmbalance.operators.html import resolve
from mmbalance.operators.report_html import write_html_report
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe


def _with_second_label(table: pa.Table, seed: int) -> pa.Table:
    """A 'scene' label (40 values) that is itself associated with gender."""
    rng = np.random.default_rng(seed)
    woman = np.array([g == "woman" for g in table.column("gender").to_pylist()])
    scene = np.where(woman, rng.integers(0, 25, table.num_rows), rng.integers(15, 40, table.num_rows))
    return table.append_column("scene", pa.array([f"s{v}" for v in scene]))


def _worst_moment(frame: pl.DataFrame, weight: str, pi: dict[str, float], label: str | None) -> float:
    carrying = frame.filter(pl.col("gender").is_not_null())
    total = carrying[weight].sum()
    worst = 0.0
    for value, p in pi.items():
        centred = (carrying["gender"] == value).cast(pl.Float64) - p
        if label is None:
            worst = max(worst, abs((carrying[weight] * centred).sum()) / total)
            continue
        for r in carrying[label].drop_nulls().unique():
            y = (carrying[label] == r).fill_null(False).cast(pl.Float64)
            worst = max(worst, abs((carrying[weight] * centred * y).sum()) / total)
    return worst


def test_families_match_the_manifest_and_name_binding_and_leakage(tmp_path):
    corpus = write_shards(tmp_path / "c", {f"s{i}.parquet": _with_second_label(held_out_table(3000, 70 + i), i) for i in range(2)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation"}, {"name": "scene"}],
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                    "associate": [["gender", "occupation"], ["gender", "scene"]],
                    "tolerance": {"representation": 0.01, "association": 0.004}, "retention": 0.5,
                    "on_infeasible": "max_retention"},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    report = result.report
    families = {f["family"]: f for f in report["constraint_families"]}
    assert list(families) == ["gender representation", "gender x occupation", "gender x scene"]

    manifest = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "gender", "occupation", "scene"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = manifest.join(truth, on="uid").with_columns(pl.lit(1.0).alias("one"))
    pi = report["solution"]["pi"]["gender"]
    for name, label in (("gender representation", None), ("gender x occupation", "occupation"), ("gender x scene", "scene")):
        fam = families[name]
        values = frame[label].n_unique() if label else 1
        assert fam["constraints"] == 2 * values
        for view, weight in (("before", "one"), ("after_expected", "weight"), ("after_realized", "repeats")):
            assert abs(fam["worst_moment"][view] - _worst_moment(frame, weight, pi, label)) < 1e-9, (name, view)
        assert fam["over_tolerance"] == 0 and fam["worst_moment"]["after_expected"] <= fam["tolerance"] * (1 + 1e-6)
        assert fam["worst_moment"]["before"] > fam["tolerance"]  # each family had something to fix
    # binding: the solver's own binding constraints of each family are the ones at their tolerance
    binding = report["solution"]["binding"]
    assert sum(f["at_tolerance"] for f in families.values()) == len(binding)
    assert families["gender x scene"]["at_tolerance"] == sum(" x scene=" in b["constraint"] for b in binding)
    # leakage from each label set, before and after, is the probe of that label set alone
    for label in ("occupation", "scene"):
        probe = report["leakage"]["gender"][f"dataset_{label}"]
        leak = families[f"gender x {label}"]["leakage"]
        assert leak["before"]["accuracy"] == probe["before"]["accuracy"] and leak["after"]["accuracy"] == probe["after"]["accuracy"]
        assert leak["after"]["accuracy"] < leak["before"]["accuracy"]

    # the HTML section shows the same numbers (every marked figure resolves to report.json's)
    page = open(write_html_report(str(tmp_path / "o"))).read()
    marked = re.findall(r'data-key="(/constraint_families/[^"]+)" data-value="([^"]+)"', page)
    assert {html.unescape(k).split("/")[3] for k, _ in marked} >= {"constraints", "at_tolerance", "worst_moment", "leakage"}
    for key, value in marked:
        assert float(value) == float(resolve(report, html.unescape(key))), key


def test_families_with_held_labels_use_the_solvers_per_pair_prevalence(tmp_path):
    """hold_labels centres an untargeted attribute on its prevalence among rows carrying the label
    too; with null labels that differs from the prevalence over all carrying rows."""
    def table(i):
        t = _with_second_label(held_out_table(3000, 90 + i), i)
        # men's rows lack a scene more often, so the prevalence among rows with a scene differs
        scene = [None if (g == "man" and j % 2 == 0) else s
                 for j, (g, s) in enumerate(zip(t.column("gender").to_pylist(), t.column("scene").to_pylist()))]
        return t.set_column(t.column_names.index("scene"), "scene", pa.array(scene, pa.string()))

    corpus = write_shards(tmp_path / "c", {f"s{i}.parquet": table(i) for i in range(2)})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid"}},
        "attributes": [{"name": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "scene"}],
        "balance": {"method": "m4", "associate": [["gender", "scene"]], "hold_labels": True,
                    "tolerance": {"association": 0.004}, "budget": False, "max_weight": 3.0, "retention": 0.5},
        "report": {"leakage": False},
    })
    report = rebalance(str(corpus), str(tmp_path / "o"), recipe,
                       RunOptions(executor="local", show_progress=False, html_report=False)).report
    pair_pi = report["solution"]["pi_by_pair"]["gender x scene"]
    assert abs(pair_pi["woman"] - report["solution"]["pi"]["gender"]["woman"]) > 1e-3  # the two centrings differ
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "o" / "manifest").glob("*.parquet"))])
    truth = pl.concat([pl.read_parquet(p, columns=["uid", "gender", "scene"]) for p in sorted(corpus.glob("*.parquet"))])
    frame = manifest.join(truth, on="uid")
    (fam,) = report["constraint_families"]
    assert abs(fam["worst_moment"]["after_expected"] - _worst_moment(frame, "weight", pair_pi, "scene")) < 1e-9
    assert fam["over_tolerance"] == 0 and fam["at_tolerance"] == report["solution"]["binding_constraints"]
