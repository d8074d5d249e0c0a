"""``mmbalance inspect`` on a shard directory (footers + bounded sample) and on a run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards, write_with_flipped_byte
from mmbalance.cli import app
from mmbalance.inspect import inspect_path
from mmbalance.operators.html import fmt
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.io.recipes import load_recipe
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE, synth_corpus


def _console() -> Console:
    return Console(record=True, width=250, color_system=None)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("inspect")
    synth_corpus(base / "corpus", 2000, 3, seed=1, dim=8, images=False)
    recipe = parse_recipe(DEMO_RECIPE, "demo recipe")
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False))
    return base


def test_shard_directory_footers_and_bounded_sample(held_out_corpus, monkeypatch):
    files = sorted(held_out_corpus.rglob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    gender_nulls = sum(pq.read_table(f, columns=["gender"])["gender"].null_count for f in files)

    reads = []
    original = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, row_groups=None, columns=None, **kw):
        reads.append((batch_size, list(columns or [])))
        return original(self, batch_size=batch_size, row_groups=row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    console = _console()
    summary = inspect_path(str(held_out_corpus), console=console, sample_rows=600, sample_shards=2)
    text = console.export_text().replace("\u00a0", " ")

    assert summary["shards"] == len(files) == 4 and summary["rows"] == rows
    assert summary["columns"]["gender"]["nulls"] == gender_nulls
    assert summary["columns"]["image_emb"]["shards"] == 4
    # the sample: two shards, 300 rows each, tag-like columns only, embeddings never read
    assert len(reads) == 2 and all(b == 300 for b, _ in reads)
    assert not any("image_emb" in cols or "text_emb" in cols for _, cols in reads)
    assert summary["sample_rows"] == 600
    assert summary["attributes"] == ["gender"] and summary["labels"] == ["occupation"]
    assert f"{fmt(rows)} rows" in text and fmt(gender_nulls) in text

    # prevalence and the worst association, recomputed from the same rows
    sample = pl.concat([pl.from_arrow(pq.read_table(f, columns=["gender", "occupation"]).slice(0, 300)) for f in (files[0], files[-1])])
    women = sample["gender"].drop_nulls()
    share = (women == "woman").sum() / len(women)
    assert summary["prevalence"]["gender"]["top"][0][2] == pytest.approx(max(share, 1 - share))
    assert f"woman {fmt(share)}" in text
    worst = summary["associations"][0]
    carrying = sample.filter(pl.col("gender").is_not_null())
    is_v = carrying["gender"] == worst["value"]
    is_r = carrying["occupation"] == worst["label_value"]
    gap = (is_v & is_r).sum() / is_v.sum() - (~is_v & is_r).sum() / (~is_v).sum()
    assert worst["gap"] == pytest.approx(gap)
    assert fmt(worst["gap"]) in text
    gaps = [abs(p["gap"]) for p in summary["associations"]]
    assert gaps == sorted(gaps, reverse=True)
    # mirrored pairs of a two-valued attribute are listed once
    assert len({(p["label"], p["label_value"]) for p in summary["associations"]}) == len(summary["associations"])


def test_shard_directory_with_recipe_and_cluster_like_column(demo_run):
    console = _console()
    columns = {"input": DEMO_RECIPE["input"], "attributes": [{"name": "gender", "column": "gender", "values": ["woman", "man"]}],
               "labels": [{"name": "occupation", "column": "occupation"}, {"name": "cluster", "column": "subclass"}]}
    recipe = parse_recipe(columns)
    summary = inspect_path(str(demo_run / "corpus"), recipe=recipe, console=console, sample_rows=300)
    assert summary["attributes"] == ["gender"] and summary["labels"] == ["occupation", "subclass"]
    sizes = summary["sizes"]["subclass"]
    assert 1 < sizes["values"] <= 60 and sizes["largest"] <= 300
    assert "subclass" in console.export_text().replace("\u00a0", " ")


def test_shard_directory_sample_verifies_page_checksums_by_default(tmp_path):
    """execution.verify_checksums (on by default): a flipped byte in a data page of a sampled column
    is a one-line input error naming the shard; with the flag off the sample holds it as read."""
    corpus = write_shards(tmp_path / "corpus", {"a.parquet": held_out_table(200, seed=1)})
    table = held_out_table(200, seed=2)
    write_with_flipped_byte(corpus / "b.parquet", table, "occupation")
    on = tmp_path / "on.yaml"
    on.write_text(RECIPE_FROM_ISSUE + "execution: {verify_checksums: true}\n")
    with pytest.raises(InputError, match=r"^b\.parquet: unreadable data \(.*CRC") as err:
        inspect_path(str(corpus), recipe=load_recipe(on), console=_console(), sample_rows=400)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["inspect", str(corpus), "--recipe", str(on), "--sample-rows", "400"])
    assert result.exit_code == 2 and "b.parquet: unreadable data" in result.output and "CRC" in result.output

    def distinct(*tables: pa.Table) -> int:
        return len({v for t in tables for v in t.column("occupation").to_pylist() if v is not None})

    as_read = distinct(pq.read_table(corpus / "a.parquet"), pq.read_table(corpus / "b.parquet"))
    assert as_read != distinct(pq.read_table(corpus / "a.parquet"), table)  # the flipped value is a new one
    default = tmp_path / "default.yaml"
    default.write_text(RECIPE_FROM_ISSUE)
    for recipe in (load_recipe(default), None):  # no recipe: the default too
        with pytest.raises(InputError, match=r"^b\.parquet: unreadable data \(.*CRC"):
            inspect_path(str(corpus), recipe=recipe, console=_console(), sample_rows=400)
    off = tmp_path / "off.yaml"
    off.write_text(RECIPE_FROM_ISSUE + "execution: {verify_checksums: false}\n")
    summary = inspect_path(str(corpus), recipe=load_recipe(off), console=_console(), sample_rows=400)
    assert summary["sample_rows"] == 400 and summary["prevalence"]["occupation"]["distinct"] == as_read


def test_run_directory_numbers_match_report(demo_run):
    run = demo_run / "run"
    report = json.loads((run / "report.json").read_text())
    console = _console()
    summary = inspect_path(str(run), console=console)
    text = console.export_text().replace("\u00a0", " ")

    assert summary["kind"] == "run" and summary["report"]
    manifest_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (run / "manifest").glob("*.parquet"))
    assert summary["manifest_rows"] == manifest_rows == report["rows"]["manifest"]
    assert summary["done"]["weigh"] == 3
    for value in (report["rows"]["input"], report["weights"]["ess"], report["weights"]["retention"],
                  report["weights"]["expected_rows"], report["weights"]["realized_rows"]):
        assert fmt(value) in text
    # prevalence from the signature tables equals the report's representation shares
    for view, key in (("prevalence_before", "before"), ("prevalence_after", "after_expected")):
        top = {v: s for v, _, s in summary[view]["gender"]["top"]}
        for v, s in report[key]["representation"]["gender"]["share"].items():
            assert top[v] == pytest.approx(s)
            assert f"{v} {fmt(s)}" in text
    first = summary["associations"][0]
    worst = report["before"]["association"][0]["worst_pairs"][0]
    assert (first["value"], first["label_value"], first["before"]) == (worst["value"], worst["label"], worst["gap"])
    assert first["after"] == report["after_expected"]["association"][0]["gaps"][worst["value"]][worst["label"]]
    for key in ("before", "after_expected"):
        assert fmt(report[key]["concept_balance"]["occupation"]["gini"]) in text


def test_unfinished_run(demo_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(demo_run / "run", copy)
    (copy / "report.json").unlink()
    console = _console()
    summary = inspect_path(str(copy), console=console)
    assert summary["report"] is False
    assert "has not finished" in console.export_text().replace("\u00a0", " ")


def test_cli_inspect_and_report(demo_run):
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(demo_run / "run")])
    assert result.exit_code == 0, result.output
    assert "top associations" in result.output
    result = runner.invoke(app, ["report", str(demo_run / "run")])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == demo_run / "run" / "report.html" and path.stat().st_size > 10_000
    result = runner.invoke(app, ["inspect", str(demo_run / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_shard_directory_and_validate_name_shards_without_page_checksums(tmp_path):
    """A flipped bit in a shard written without page CRCs cannot be caught: inspect and validate say
    which shards those are (here two of three; pyarrow writes none unless asked)."""
    corpus = write_shards(tmp_path / "corpus", {"a.parquet": held_out_table(100, seed=1), "b.parquet": held_out_table(100, seed=2)})
    pq.write_table(held_out_table(100, seed=3), corpus / "c.parquet", write_page_checksum=True)
    console = _console()
    summary = inspect_path(str(corpus), console=console, sample_rows=50)
    assert summary["shards_without_page_checksums"] == 2
    warning = "page checksums: none in 2 of 3 shards (a.parquet, ...): a flipped bit there reads back as a wrong value"
    assert warning in console.export_text().replace("\n", " ")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_FROM_ISSUE)
    result = CliRunner().invoke(app, ["validate", str(corpus), "--recipe", str(recipe)])
    assert result.exit_code == 0 and warning in " ".join(result.output.split()), result.output
    (corpus / "a.parquet").unlink()
    (corpus / "b.parquet").unlink()
    console = _console()
    assert inspect_path(str(corpus), console=console, sample_rows=50)["shards_without_page_checksums"] == 0
    assert "page checksums" not in console.export_text()
