"""``mmbalance export OUT --format ...`` re-exports an existing run without recomputing."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mmbalance.cli import app
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE, synth_corpus


def test_export_command(tmp_path):
    synth_corpus(tmp_path / "corpus", 200, 2, seed=1, dim=8)
    recipe = parse_recipe({**DEMO_RECIPE, "balance": {"method": "cap", "by": "occupation", "cap": 15}})
    rebalance(str(tmp_path / "corpus"), str(tmp_path / "run"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    manifest_before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "run" / "manifest").iterdir())
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "-f", "webdataset,datacomp", "--domain", "occupation", "--shard-size", "5"])
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "run" / "export" / "webdataset" / "open_clip.json").read_text())
    # the command is in a script beside the tars (thousands of characters with many domains), named in the output
    script = tmp_path / "run" / "export" / "webdataset" / "train_open_clip.sh"
    assert f"train: sh {script}" in res.output and spec["open_clip_command"] not in res.output
    lines = script.read_text()
    assert "--train-data-upsampling-factors" in lines and "--dataset-resampled" in lines
    assert (tmp_path / "run" / "export" / "datacomp" / "uids.npy").is_file()
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "run" / "manifest").iterdir()) == manifest_before
    mixture = json.loads((tmp_path / "run" / "export" / "mixture.json").read_text())
    assert mixture["open_clip"]["webdataset"]["open_clip_command"] == spec["open_clip_command"]
    assert mixture["copies"] == "repeats" and mixture["open_clip"]["webdataset"]["epoch"]["shard_size"] == 5
    sized = runner.invoke(app, ["export", str(tmp_path / "run"), "-f", "webdataset", "--domain", "occupation",
                                "--max-share-deviation", "0.2", "--epoch-size", "1000"])
    assert sized.exit_code == 0, sized.output
    epoch = json.loads((tmp_path / "run" / "export" / "mixture.json").read_text())["open_clip"]["webdataset"]["epoch"]
    assert epoch["max_share_deviation"] == 0.2 and epoch["within_bound"] and epoch["shard_size_from"] == "max_share_deviation"
    floored = runner.invoke(app, ["export", str(tmp_path / "run"), "-f", "webdataset", "--domain", "occupation",
                                  "--min-shard-size", "50", "--epoch-size", "200"])
    assert floored.exit_code == 0, floored.output
    epoch = json.loads((tmp_path / "run" / "export" / "mixture.json").read_text())["open_clip"]["webdataset"]["epoch"]
    assert epoch["shard_size"] == epoch["min_shard_size"] == 50 and epoch["shard_size_from"] == "min_shard_size"
    inverted = runner.invoke(app, ["export", str(tmp_path / "run"), "-f", "webdataset", "--domain", "occupation",
                                   "--min-shard-size", "20000"])
    assert inverted.exit_code == 2 and inverted.output.strip().splitlines() == [
        "mmbalance: error: export options: webdataset: min_shard_size 20000 exceeds max_shard_size 10000"]
    bad = runner.invoke(app, ["export", str(tmp_path / "run"), "-f", "csv", "--domain", "nope"])
    assert bad.exit_code == 2 and "tag.nope" in bad.output
    none = runner.invoke(app, ["export", str(tmp_path / "run")])
    assert none.exit_code == 2 and "no format" in none.output
