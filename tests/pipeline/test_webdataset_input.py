"""WebDataset tars as input: the same rows as Parquet give the same run (manifest weights, rejects and
their reasons, by uid), the format is found from the files, and a resume notices a changed tar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, table_as_samples, write_shards, write_tar

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe, recipe_from_yaml

LOCAL = RunOptions(executor="local", show_progress=False)


def dirty_tables() -> dict[str, pa.Table]:
    """Three shards with a bad attribute value, a null embedding and a uid repeated across shards."""
    tables = {f"s{i}": held_out_table(300, 40 + i) for i in range(3)}
    a = tables["s0"].to_pylist()
    a[5]["gender"] = "x"
    a[9]["image_emb"] = None
    tables["s0"] = pa.Table.from_pylist(a, schema=tables["s0"].schema)
    b = tables["s1"].to_pylist()
    b[7]["uid"] = a[3]["uid"]  # a duplicate of s0's row 3
    tables["s1"] = pa.Table.from_pylist(b, schema=tables["s1"].schema)
    return tables


def wds_recipe():
    data = recipe_from_yaml(RECIPE_FROM_ISSUE, "r").model_dump(mode="json", exclude_unset=True)
    data["input"]["columns"] = {"caption": "txt", "image_embedding": "image_emb", "text_embedding": "text_emb"}
    return parse_recipe(data)  # uid: the sample key (default for tars)


def by_uid(run: Path, directory: str) -> pl.DataFrame:
    files = sorted((run / directory).rglob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()


def test_a_run_over_tars_equals_the_run_over_the_same_rows_in_parquet(tmp_path, issue_recipe):
    tables = dirty_tables()
    parquet = write_shards(tmp_path / "pq", {f"{k}.parquet": t for k, t in tables.items()})
    for name, table in tables.items():
        write_tar(tmp_path / "wds" / f"{name}.tar", table_as_samples(table))
    a = rebalance(str(parquet), str(tmp_path / "a"), issue_recipe, LOCAL)
    b = rebalance(str(tmp_path / "wds"), str(tmp_path / "b"), wds_recipe(), LOCAL)  # found from the .tar files
    assert b.report["rows"] == a.report["rows"] and a.report["rows"]["rejected"] == 3
    ma, mb = by_uid(tmp_path / "a", "manifest"), by_uid(tmp_path / "b", "manifest")
    joined = ma.join(mb, on="uid", how="full", suffix="_b", coalesce=True)
    assert joined.height == ma.height == mb.height == a.report["rows"]["manifest"]
    assert (joined["weight"] == joined["weight_b"]).all() and (joined["row"] == joined["row_b"]).all()
    ra = by_uid(tmp_path / "a", "rejects").select("uid", "row", "reason").sort("uid", "row")
    rb = by_uid(tmp_path / "b", "rejects").select("uid", "row", "reason").sort("uid", "row")
    rb = rb.with_columns(pl.col("reason").str.replace("s1.tar", "s1.parquet").str.replace("s0.tar", "s0.parquet"))
    assert ra.equals(rb) and ra.height == 3
    assert b.report["before"] == a.report["before"] and b.report["after_expected"] == a.report["after_expected"]


def test_img2dataset_webdataset_layout_is_found_and_its_failures_are_rejected_with_their_messages(tmp_path):
    corpus = tmp_path / "i2d"
    for shard in range(2):
        keys = [f"{shard:05d}{i:04d}" for i in range(6)]
        ok = [k for i, k in enumerate(keys) if i != 2]
        write_tar(corpus / f"{shard:05d}.tar", [(k, {"jpg": b"\xff\xd8\xffdata", "txt": f"caption {k}".encode(),
                                                      "json": json.dumps({"key": k, "status": "success"}).encode()})
                                                  for k in reversed(ok)])
        pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys],
                                 "status": ["failed_to_download" if i == 2 else "success" for i in range(6)],
                                 "error_message": ["HTTP Error 404: Not Found" if i == 2 else None for i in range(6)]}),
                       corpus / f"{shard:05d}.parquet")
        (corpus / f"{shard:05d}_stats.json").write_text("{}")
    recipe = parse_recipe({"input": {"columns": {"caption": "txt", "image": "jpg"}}})
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    assert result.report["rows"]["input"] == 12 and result.report["rows"]["manifest"] == 10
    assert result.report["rows"]["rejected_by_reason"] == {"status 'failed_to_download' is not 'success'": 2}
    rejects = by_uid(tmp_path / "o", "rejects")
    assert sorted(rejects["uid"].to_list()) == ["000000002", "000010002"]
    assert all(r.endswith(": HTTP Error 404: Not Found") for r in rejects["reason"].to_list())
    shards = json.loads((tmp_path / "o" / "shards.json").read_text())
    assert [s["relpath"] for s in shards] == ["00000.tar", "00001.tar"]  # the side tables are not shards


def test_resume_skips_finished_tars_and_a_changed_tar_is_noticed(tmp_path):
    tables = {f"s{i}": held_out_table(200, 60 + i) for i in range(2)}
    for name, table in tables.items():
        write_tar(tmp_path / "wds" / f"{name}.tar", table_as_samples(table))
    out = tmp_path / "o"
    rebalance(str(tmp_path / "wds"), str(out), wds_recipe(), LOCAL)
    manifest = {p.name: p.read_bytes() for p in (out / "manifest").iterdir()}
    redone = []
    rebalance(str(tmp_path / "wds"), str(out), wds_recipe(),
              RunOptions(executor="local", show_progress=False, on_progress=lambda stage, s: redone.append(stage)))
    assert [s for s in redone if s in ("scan", "signatures", "weigh")] == []
    assert {p.name: p.read_bytes() for p in (out / "manifest").iterdir()} == manifest
    path = tmp_path / "wds" / "s1.tar"
    data = bytearray(path.read_bytes())
    at = data.index(b"at work", len(data) // 2)
    data[at: at + 7] = b"AT WORK"  # a caption rewritten in the middle of the tar, at the same size
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"s1.tar: input shard changed since the run"):
        rebalance(str(tmp_path / "wds"), str(out), wds_recipe(), LOCAL)


def test_json_field_of_another_type_in_a_later_sample_rejects_that_row(tmp_path):
    samples = [(f"k{i:03d}", {"txt": b"c", "json": json.dumps({"occupation": "welder", "n": i}).encode()}) for i in range(80)]
    samples[70] = ("k070", {"txt": b"c", "json": json.dumps({"occupation": "welder", "n": "seventy"}).encode()})
    samples[71] = ("k071", {"txt": b"c", "json": b"{not json"})
    write_tar(tmp_path / "w" / "a.tar", samples)
    recipe = parse_recipe({"input": {"columns": {"caption": "txt", "utility": "n"}},
                           "labels": [{"name": "occupation"}]})
    result = rebalance(str(tmp_path / "w"), str(tmp_path / "o"), recipe, LOCAL)
    reasons = result.report["rows"]["rejected_by_reason"]
    assert result.report["rows"]["rejected"] == 2, reasons
    rejects = by_uid(tmp_path / "o", "rejects").sort("uid")
    assert rejects["uid"].to_list() == ["k070", "k071"]
    assert "field 'n'" in rejects["reason"][0] and "k071.json" in rejects["reason"][1]


def test_explicit_format_and_a_mixed_directory(tmp_path):
    write_tar(tmp_path / "m" / "a.tar", table_as_samples(held_out_table(10, 1)))
    write_shards(tmp_path / "m", {"b.parquet": held_out_table(10, 2)})
    with pytest.raises(InputError, match=r"b.parquet: .*not a side table of a tar.*input.format"):
        rebalance(str(tmp_path / "m"), str(tmp_path / "o"), wds_recipe(), LOCAL)
    data = wds_recipe().model_dump(mode="json", exclude_unset=True)
    data["input"]["format"] = "webdataset"
    result = rebalance(str(tmp_path / "m"), str(tmp_path / "o2"), parse_recipe(data), LOCAL)
    assert result.report["rows"]["input"] == 10
    data = parse_recipe({"input": {"format": "parquet"}}).model_dump(mode="json", exclude_unset=True)
    result = rebalance(str(tmp_path / "m"), str(tmp_path / "o3"), parse_recipe(data), LOCAL)
    assert result.report["rows"]["input"] == 10 and np.isclose(result.report["weights"]["retention"], 1.0)


def test_inspect_summarises_a_directory_of_tars(tmp_path):
    from rich.console import Console

    from mmbalance.inspect import inspect_path

    for i in range(2):
        write_tar(tmp_path / "wds" / f"s{i}.tar", table_as_samples(held_out_table(50, 30 + i)))
    console = Console(record=True, width=200)
    summary = inspect_path(str(tmp_path / "wds"), console=console)
    assert summary["shards"] == 2 and summary["rows"] == 100
    assert {"__key__", "txt", "gender", "occupation", "image_emb"} <= set(summary["columns"])
    assert "occupation" in summary["labels"] or "occupation" in summary["attributes"]
