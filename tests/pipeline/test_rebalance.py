"""End to end on held-out corpora with the local executor (the Ray path is in test_ray.py)."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import held_out_table, write_shards

from mmbalance.operators.report import view_metrics
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def read_dir(path: Path) -> pl.DataFrame:
    files = sorted(path.rglob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def input_rows(corpus: Path) -> pl.DataFrame:
    frames = []
    for f in sorted(corpus.rglob("*.parquet")):
        t = pq.read_table(f, columns=["uid", "gender", "occupation"])
        frames.append(pl.from_arrow(t).with_columns(
            pl.lit(str(f.relative_to(corpus))).alias("shard"), pl.int_range(pl.len(), dtype=pl.Int64).alias("row")))
    return pl.concat(frames)


@pytest.fixture
def dirty_corpus(tmp_path: Path) -> Path:
    """Held-out shards with planted problems: duplicates within and across shards, bad values, an empty shard."""
    a = held_out_table(2500, 1)
    b = held_out_table(2000, 2)
    c = held_out_table(1800, 3)
    uid_a = a.column("uid").to_pylist()
    uid_a[10] = uid_a[3]  # duplicate inside shard a
    a = a.set_column(0, "uid", pa.array(uid_a))
    uid_c = c.column("uid").to_pylist()
    uid_c[0] = b.column("uid")[7].as_py()  # duplicate across shards: b comes first
    c = c.set_column(0, "uid", pa.array(uid_c))
    gender = b.column("gender").to_pylist()
    gender[5] = "nonbinary"  # not in values
    b = b.set_column(4, "gender", pa.array(gender, pa.string()))
    emb = c.column("image_emb").to_pylist()
    emb[9][0] = float("nan")
    c = c.set_column(2, "image_emb", pa.array(emb, pa.list_(pa.float32())))
    return write_shards(tmp_path / "corpus", {
        "a.parquet": a, "b.parquet": b, "sub/c.parquet": c, "sub/empty.parquet": held_out_table(0, 4),
    })


def test_issue_recipe_accounts_for_every_row(dirty_corpus, tmp_path, issue_recipe):
    recipe = parse_recipe({**issue_recipe.model_dump(), "balance": {"method": "cap", "by": "occupation", "cap": 300}})
    result = rebalance(str(dirty_corpus), str(tmp_path / "out"), recipe, LOCAL)
    out = tmp_path / "out"
    manifest = read_dir(out / "manifest")
    rejects = read_dir(out / "rejects")
    truth = input_rows(dirty_corpus)

    # every input (shard, row) is in exactly one of manifest and rejects
    keys = pl.concat([manifest.select("shard", "row"), rejects.select("shard", "row")])
    assert keys.height == truth.height == 2500 + 2000 + 1800
    assert keys.unique().height == truth.height
    assert keys.sort("shard", "row").equals(truth.select("shard", "row").sort("shard", "row"))
    assert result.report["rows"] == {
        "input": truth.height, "manifest": manifest.height, "rejected": rejects.height,
        "rejected_by_reason": {"attribute gender": 1, "duplicate uid": 2, "image_embedding": 1},
    }
    reasons = dict(zip(zip(rejects["shard"], rejects["row"]), rejects["reason"]))
    assert reasons[("a.parquet", 10)] == "duplicate uid: first seen in a.parquet row 3"
    assert reasons[("sub/c.parquet", 0)] == "duplicate uid: first seen in b.parquet row 7"
    assert "nonbinary" in reasons[("b.parquet", 5)]
    assert "NaN or inf" in reasons[("sub/c.parquet", 9)]
    assert manifest["uid"].n_unique() == manifest.height

    # the cap rule, exactly: expected rows per occupation = min(count, cap)
    joined = manifest.join(truth, on=["shard", "row"], how="left")
    per_occ = joined.group_by("occupation").agg(pl.col("weight").sum(), pl.len().alias("n"))
    for occ, w, n in per_occ.iter_rows():
        assert w == pytest.approx(min(n, 300), rel=1e-12)
    assert set(manifest["repeats"].unique().to_list()) <= {0, 1}
    assert ((manifest["repeats"] == 0) | (manifest["weight"] > 0)).all()

    # the report's after-metrics equal the same metrics recomputed from the manifest
    frame = joined.rename({"gender": "tag.gender", "occupation": "tag.occupation"})
    vocab = {"gender": ["woman", "man"], "occupation": sorted(truth["occupation"].unique().to_list())}
    for column, view in (("weight", "after_expected"), ("repeats", "after_realized")):
        mine = view_metrics(frame.with_columns(pl.col(column).cast(pl.Float64)), column, recipe, vocab)
        assert mine["rb"] == pytest.approx(result.report[view]["rb"], abs=1e-12)
        assert mine["ab"] == pytest.approx(result.report[view]["ab"], abs=1e-12)
    assert result.report["weights"]["realized_rows"] == manifest["repeats"].sum()
    assert result.report["weights"]["expected_rows"] == pytest.approx(manifest["weight"].sum())
    # capping the head occupations changes the mix: the concept distribution gets flatter
    assert result.report["after_expected"]["concept_balance"]["occupation"]["gini"] < \
        result.report["before"]["concept_balance"]["occupation"]["gini"]

    run = json.loads((out / "run.json").read_text())
    assert run["recipe_fingerprint"] == recipe.fingerprint() and run["seeds"] == {"export": 0}
    assert run["input_rows"] == truth.height and run["shards"] == 4


def test_rerun_skips_finished_work_and_is_byte_identical(held_out_corpus, tmp_path, issue_recipe):
    calls: list[str] = []
    opts = RunOptions(executor="local", show_progress=False, on_progress=lambda stage, s: calls.append(stage))
    rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe, opts)
    first = {p.name: p.read_bytes() for p in (tmp_path / "o" / "manifest").iterdir()}
    assert calls.count("scan") == 4 and calls.count("weigh") == 4
    calls.clear()
    rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe, opts)
    assert calls == []
    assert {p.name: p.read_bytes() for p in (tmp_path / "o" / "manifest").iterdir()} == first


class Crash(Exception):
    pass


@pytest.mark.parametrize("stage, after_units", [("scan", 2), ("signatures", 1), ("weigh", 3)])
def test_crash_mid_stage_resumes_with_identical_manifest(held_out_corpus, tmp_path, issue_recipe, stage, after_units):
    rebalance(str(held_out_corpus), str(tmp_path / "clean"), issue_recipe, LOCAL)
    seen: list[str] = []

    def crash(name, summary):
        seen.append(name)
        if name == stage and seen.count(stage) == after_units:
            raise Crash()

    with pytest.raises(Crash):
        rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe, RunOptions(executor="local", show_progress=False, on_progress=crash))
    redone: list[str] = []
    rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe,
              RunOptions(executor="local", show_progress=False, on_progress=lambda n, s: redone.append(n)))
    assert redone.count(stage) == 4 - after_units
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean" / "manifest").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "o" / "manifest").iterdir()} == clean
    assert not list((tmp_path / "o").rglob(".tmp-*"))


def test_other_recipe_in_same_out_needs_overwrite(held_out_corpus, tmp_path, issue_recipe):
    rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe, LOCAL)
    other = parse_recipe({**issue_recipe.model_dump(), "export": {"seed": 5}})
    with pytest.raises(InputError, match="holds a run with a different recipe"):
        rebalance(str(held_out_corpus), str(tmp_path / "o"), other, LOCAL)
    result = rebalance(str(held_out_corpus), str(tmp_path / "o"), other, RunOptions(executor="local", show_progress=False, overwrite=True))
    assert result.report["rows"]["manifest"] == sum(3000 + 250 * i for i in range(4))


def test_non_empty_foreign_out_dir_is_refused(held_out_corpus, tmp_path, issue_recipe):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        rebalance(str(held_out_corpus), str(tmp_path / "o"), issue_recipe, LOCAL)


def test_recipe_naming_a_missing_column(held_out_corpus, tmp_path, issue_recipe):
    recipe = parse_recipe({**issue_recipe.model_dump(), "labels": [{"name": "occupation", "column": "job"}]})
    with pytest.raises(InputError, match=r"shard-0.parquet: missing column 'job'"):
        rebalance(str(held_out_corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.parquet"))


def test_datacomp_layout_without_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    tables = {f"{i:08d}.parquet": pa.table({
        "uid": [f"{rng.integers(0, 2**63):032x}" for _ in range(500)],
        "text": [f"caption {j}" for j in range(500)],
        "url": [f"http://x/{j}" for j in range(500)],
        "original_width": rng.integers(64, 1024, 500),
    }) for i in range(3)}
    corpus = write_shards(tmp_path / "dc", tables)
    recipe = parse_recipe({"input": {"columns": {"uid": "uid", "caption": "text"}}})
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert result.report["rows"]["manifest"] == 1500 and result.report["weights"]["retention"] == 1.0


def test_img2dataset_layout_with_status_and_hf_image_structs(tmp_path):
    n = 40
    status = ["success"] * n
    status[3] = "failed_to_download"
    img = pa.array([{"bytes": b"\x89PNG fake", "path": f"{i}.png"} for i in range(n)],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"key": [f"{i:09d}" for i in range(n)], "caption": ["c"] * n, "url": ["u"] * n,
                      "status": status, "jpg": img, "occupation": (["a", "b", "b", "b"] * 10)})
    corpus = write_shards(tmp_path / "i2d", {"00000.parquet": table})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "key", "caption": "caption", "image": "jpg", "status": "status"}},
        "labels": [{"name": "occupation"}],
        "balance": {"method": "cap", "by": "occupation", "cap": 10},
    })
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert result.report["rows"]["rejected_by_reason"] == {"status 'failed_to_download' is not 'success'": 1}
    assert result.report["solution"]["values_capped"] == 1  # b has 29 valid rows
    assert result.report["weights"]["expected_rows"] == pytest.approx(10 + 10)


def test_integer_uids_and_single_file_input(tmp_path):
    table = pa.table({"id": pa.array(range(100), pa.int64()), "occupation": ["x"] * 60 + ["y"] * 40})
    corpus = write_shards(tmp_path / "c", {"only.parquet": table})
    recipe = parse_recipe({"input": {"columns": {"uid": "id"}}, "labels": [{"name": "occupation"}],
                           "balance": {"method": "cap", "by": "occupation", "cap": 30}})
    result = rebalance(str(corpus / "only.parquet"), str(tmp_path / "o"), recipe, LOCAL)
    assert result.report["weights"]["expected_rows"] == pytest.approx(60.0)
    manifest = read_dir(tmp_path / "o" / "manifest")
    assert manifest["uid"].to_list()[:3] == ["0", "1", "2"] and set(manifest["shard"]) == {"only.parquet"}


def test_null_uids_everywhere_and_zero_valid_rows(tmp_path, issue_recipe):
    t = held_out_table(20, 1)
    t = t.set_column(0, "uid", pa.nulls(20, pa.string()))
    corpus = write_shards(tmp_path / "c", {"a.parquet": t})
    result = rebalance(str(corpus), str(tmp_path / "o"), issue_recipe, LOCAL)
    assert result.report["rows"]["rejected"] == 20 and result.report["rows"]["manifest"] == 0
    assert result.report["weights"]["retention"] == 0.0


def test_second_writer_is_refused_and_stale_temporaries_are_swept(held_out_corpus, tmp_path, issue_recipe):
    from mmbalance.io.store import RunLockedError, RunStore

    out = tmp_path / "o"
    (out / "tags").mkdir(parents=True)
    (out / "tags" / ".tmp-deadbeef-x.parquet").write_bytes(b"half-written by a killed worker")
    with RunStore(str(out)).lock():
        with pytest.raises(RunLockedError, match="another mmbalance run is writing"):
            rebalance(str(held_out_corpus), str(out), issue_recipe, LOCAL)
    rebalance(str(held_out_corpus), str(out), issue_recipe, LOCAL)
    assert not list(out.rglob(".tmp-*"))


def test_stage_stats_reconcile_with_the_row_accounting(dirty_corpus, tmp_path, issue_recipe):
    result = rebalance(str(dirty_corpus), str(tmp_path / "o"), issue_recipe, LOCAL)
    stages = json.loads((tmp_path / "o" / "stats" / "stages.json").read_text())
    assert stages == result.report["stages"]
    rows = result.report["rows"]
    assert stages["scan"]["rows_in"] == rows["input"] and stages["scan"]["units"] == 4
    assert stages["scan"]["rejected"] + stages["signatures"]["rejected"] == rows["rejected"]
    assert stages["weigh"]["rows_out"] == rows["manifest"] == stages["signatures"]["rows_out"]
    # dedup finds duplicates, the signatures stage rejects them: one accounting schema for every stage
    assert stages["dedup"]["rejected"] == 0 and stages["signatures"]["reasons"] == {"duplicate uid": 2}
    assert stages["scan"]["reasons"] == {"attribute gender": 1, "image_embedding": 1}
    assert stages["signatures"]["rows_in"] == stages["scan"]["rows_out"] and "wall_seconds" in stages["solve"]
    assert stages["weigh"]["rows_in"] == stages["weigh"]["rows_out"] == stages["signatures"]["rows_out"]
    assert stages["scan"]["task_seconds"] > 0 and stages["weigh"]["task_seconds"] > 0
    for name in ("scan", "dedup", "signatures", "weigh"):  # per-unit distributions
        dist = stages[name]["seconds_per_unit"]
        assert 0 < dist["p50"] <= dist["p95"] <= dist["max"]
        assert len(stages[name]["slowest"]) == min(5, stages[name]["units"])
        assert stages[name]["slowest"][0]["seconds"] == dist["max"]
    slow = stages["scan"]["slowest"]
    assert [s["seconds"] for s in slow] == sorted((s["seconds"] for s in slow), reverse=True)
    assert {s["unit"] for s in slow} <= {p.stem for p in (tmp_path / "o" / "manifest").iterdir()}
