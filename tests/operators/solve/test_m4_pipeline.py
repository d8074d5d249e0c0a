"""M4 end to end (local executor): moments from the manifest weights against the true columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import synth_corpus

ISSUE_BALANCE = """\
balance:
  method: m4
  targets: {gender: {woman: 0.5, man: 0.5}}
  associate: [[gender, occupation]]
  tolerance: {representation: 0.01, association: 0.01}
  retention: 0.9
  max_weight: 1.0
"""
COLUMNS = {
    "input": {"columns": {"uid": "uid"}},
    "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
    "labels": [{"name": "occupation", "source": "column", "column": "occupation"}],
}


def mild_corpus(directory: Path, rows: int, seed: int) -> Path:
    """Gender shares near 1/2 in every occupation: the issue's retention 0.9 is feasible."""
    rng = np.random.default_rng(seed)
    jobs = np.array(["welder", "florist", "judge", "barista", "tailor"])
    occ = rng.choice(len(jobs), size=rows, p=[0.4, 0.25, 0.15, 0.12, 0.08])
    p_woman = np.array([0.45, 0.56, 0.5, 0.52, 0.47])[occ]
    gender = np.where(rng.random(rows) < 0.1, None, np.where(rng.random(rows) < p_woman, "woman", "man"))
    directory.mkdir(parents=True)
    for part in range(2):
        sl = slice(part * rows // 2, (part + 1) * rows // 2)
        pq.write_table(pa.table({
            "uid": [f"m{i}" for i in range(rows)][sl],
            "gender": pa.array(gender[sl].tolist(), pa.string()),
            "occupation": jobs[occ][sl].tolist(),
        }), directory / f"part-{part}.parquet")
    return directory


def weighted_rows(out: Path, corpus: Path) -> pl.DataFrame:
    manifest = pl.concat([pl.read_parquet(f) for f in sorted((out / "manifest").glob("*.parquet"))])
    source = pl.concat([pl.read_parquet(f, columns=["uid", "gender", "occupation"]) for f in sorted(corpus.glob("*.parquet"))])
    joined = manifest.join(source, on="uid", how="inner")
    assert joined.height == source.height == manifest.height
    return joined


def check_moments(rows: pl.DataFrame, pi: dict[str, float], eps_r: float, eps_a: float) -> None:
    carrying = rows.filter(pl.col("gender").is_not_null())
    W = carrying["weight"].sum()
    w = carrying["weight"].to_numpy()
    g = carrying["gender"].to_numpy()
    occ = carrying["occupation"].to_numpy()
    for k, p in pi.items():
        centred = (g == k) - p
        assert abs(float((w * centred).sum())) / W <= eps_r + 1e-6
        for r in np.unique(occ):
            assert abs(float((w * centred * (occ == r)).sum())) / W <= eps_a + 1e-6


@pytest.mark.parametrize("corpus_kind", ["mild", "synth"])
def test_m4_run_meets_the_moments_on_the_manifest(tmp_path, corpus_kind):
    balance = yaml.safe_load(ISSUE_BALANCE)
    if corpus_kind == "mild":
        corpus = mild_corpus(tmp_path / "corpus", 4000, seed=3)
    else:  # synth's planted association is strong: 0.9 is infeasible, ask for the largest feasible
        corpus = tmp_path / "corpus"
        synth_corpus(corpus, 4000, 2, seed=5, dim=8, images=False)
        balance["balance"]["on_infeasible"] = "max_retention"
    recipe = parse_recipe({**COLUMNS, **balance})
    result = rebalance(str(corpus), str(tmp_path / "out"), recipe, RunOptions(executor="local", show_progress=False))
    solution = result.report["solution"]
    rows = weighted_rows(tmp_path / "out", corpus)
    check_moments(rows, {"woman": 0.5, "man": 0.5}, 0.01, 0.01)
    retention = rows["weight"].sum() / rows.height
    assert rows["weight"].max() <= 1.0 + 1e-12 and rows["weight"].min() >= 0.0
    if corpus_kind == "mild":
        assert solution["status"] == "optimal"
        assert retention == pytest.approx(0.9, rel=1e-9)
    else:
        assert solution["status"] == "solved_at_largest_feasible_retention"
        assert retention == pytest.approx(solution["largest_feasible_retention"], rel=1e-5)
        assert retention < 0.9
    assert solution["retention"] == pytest.approx(retention, rel=1e-9)
    # the report's RB is the same figure recomputed from the manifest
    carrying = rows.filter(pl.col("gender").is_not_null())
    share = carrying.filter(pl.col("gender") == "woman")["weight"].sum() / carrying["weight"].sum()
    assert result.report["after_expected"]["rb"] == pytest.approx(abs(0.5 - share), abs=1e-9)
    assert result.report["after_expected"]["rb"] <= 0.01 + 1e-6
