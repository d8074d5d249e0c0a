"""S3-compatible object stores as first-class input, output and export locations, against moto's S3
server on loopback: a run S3 -> S3 equal to a local run, the recipe read from a URI, the ``storage``
section, a missing bucket, the run lock as a conditional put, SIGTERM and resume, exports uploaded
one request per file, and the trainer command reading the tars from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from corpora import RECIPE_FROM_ISSUE, held_out_table, table_as_samples, write_shards, write_tar
from object_store import CREDENTIALS, make_bucket, start_moto, upload_dir
from signals import sigterm_when
from typer.testing import CliRunner

from mmbalance.cli import app
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.io.store import RunLockedError, RunStore
from mmbalance.schemas.recipe import parse_recipe

pytest.importorskip("moto")
LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = start_moto(tmp_path_factory.mktemp("moto"))
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_fs(moto) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=moto.endpoint.split("://")[1], scheme="http", region="us-east-1")


def recipe_text(moto, **storage) -> str:
    section = {"endpoint": moto.endpoint, **storage}
    return RECIPE_FROM_ISSUE + "report: {html: false, leakage: false}\n" + yaml.safe_dump({"storage": section})


def cli_env(moto, endpoint_in_env: bool) -> dict[str, str]:
    env = {**os.environ, **CREDENTIALS, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("AWS_ENDPOINT_URL", None)
    if endpoint_in_env:
        env["AWS_ENDPOINT_URL"] = moto.endpoint
    return env


def objects(moto, uri: str) -> dict[str, bytes]:
    fs, root = s3_fs(moto), uri.removeprefix("s3://")
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(root) + 1:]] = f.read()
    return out


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_from_s3_to_s3_with_the_recipe_on_s3_equals_a_local_run(moto, tmp_path):
    corpus = write_shards(tmp_path / "c", {f"s{i}.parquet": held_out_table(300, 70 + i) for i in range(3)})
    make_bucket(moto, "corpus-a")
    upload_dir(moto, corpus, "s3://corpus-a/c")
    make_bucket(moto, "recipes")
    text = recipe_text(moto, create_bucket=True)
    with s3_fs(moto).open_output_stream("recipes/r.yaml") as f:
        f.write(text.encode())
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", "s3://corpus-a/c", "--out", "s3://run-a/run",
           "--recipe", "s3://recipes/r.yaml", "--executor", "local", "-q"]
    res = subprocess.run(cmd, env=cli_env(moto, True), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (tmp_path / "r.yaml").write_text(text)
    rebalance(str(corpus), str(tmp_path / "local"), parse_recipe(yaml.safe_load(text)), LOCAL)
    remote = {k: v for k, v in objects(moto, "s3://run-a/run").items() if k.startswith("manifest/")}
    assert remote == {k: v for k, v in local_files(tmp_path / "local").items() if k.startswith("manifest/")} and remote
    report = subprocess.run([sys.executable, "-m", "mmbalance.cli", "report", "s3://run-a/run"], env=cli_env(moto, True),
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == "s3://run-a/run/report.html"
    assert s3_fs(moto).get_file_info("run-a/run/report.html").type == pafs.FileType.File


def test_a_missing_output_bucket_is_one_line_and_exit_2_unless_creation_is_asked_for(moto, tmp_path):
    corpus = write_shards(tmp_path / "c", {"s0.parquet": held_out_table(100, 1)})
    (tmp_path / "r.yaml").write_text(recipe_text(moto))
    args = ["rebalance", str(corpus), "--out", "s3://no-such-bucket/run", "--recipe", str(tmp_path / "r.yaml"),
            "--executor", "local", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://no-such-bucket" in lines[0] and "storage.create_bucket" in lines[0], lines
    (tmp_path / "r.yaml").write_text(recipe_text(moto, create_bucket=True))
    assert CliRunner().invoke(app, args).exit_code == 0


def test_the_run_lock_is_a_conditional_put_on_the_store(moto, tmp_path):
    corpus = write_shards(tmp_path / "c", {"s0.parquet": held_out_table(100, 2)})
    recipe = parse_recipe(yaml.safe_load(recipe_text(moto, create_bucket=True)))
    rebalance(str(corpus), "s3://lock-run/first", recipe, LOCAL)  # configures the store and makes the bucket
    store = RunStore("s3://lock-run/held")
    with store.lock():
        assert s3_fs(moto).get_file_info("lock-run/held/.lock").type == pafs.FileType.File
        with pytest.raises(RunLockedError, match=r"s3://lock-run/held: another mmbalance run is writing"):
            rebalance(str(corpus), "s3://lock-run/held", recipe, LOCAL)
    assert s3_fs(moto).get_file_info("lock-run/held/.lock").type == pafs.FileType.NotFound  # released
    rebalance(str(corpus), "s3://lock-run/held", recipe, LOCAL)
    # a lock its holder stopped renewing (killed with -9) is taken over once its lease has run out
    with s3_fs(moto).open_output_stream("lock-run/stale/.lock") as f:
        f.write(json.dumps({"owner": "elsewhere:1", "lease_seconds": 1}).encode())
    time.sleep(2.2)
    rebalance(str(corpus), "s3://lock-run/stale", recipe, LOCAL)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_on_the_store_then_the_rerun_resumes_to_the_local_manifest(moto, tmp_path):
    corpus = write_shards(tmp_path / "c", {f"s{i:02d}.parquet": held_out_table(800, 80 + i) for i in range(8)})
    (tmp_path / "r.yaml").write_text(recipe_text(moto, create_bucket=True))
    cmd = [sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", "s3://run-kill/run",
           "--recipe", str(tmp_path / "r.yaml"), "--executor", "local", "-q"]
    proc = subprocess.Popen(cmd, env=cli_env(moto, False), stderr=subprocess.PIPE, text=True, start_new_session=True)
    fs = s3_fs(moto)
    err = sigterm_when(proc, lambda: bool(fs.get_file_info(pafs.FileSelector("run-kill/run/_done/scan", allow_not_found=True))),
                       wait_s=200, poll_s=0.05)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "mmbalance: error: terminated; rerun the same command to resume"
    assert fs.get_file_info("run-kill/run/.lock").type == pafs.FileType.NotFound
    assert fs.get_file_info("run-kill/run/report.json").type == pafs.FileType.NotFound
    rerun = subprocess.run(cmd, env=cli_env(moto, False), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rebalance(str(corpus), str(tmp_path / "local"), parse_recipe(yaml.safe_load((tmp_path / "r.yaml").read_text())), LOCAL)
    remote = {k: v for k, v in objects(moto, "s3://run-kill/run").items() if k.startswith("manifest/")}
    assert remote == {k: v for k, v in local_files(tmp_path / "local").items() if k.startswith("manifest/")}


def test_webdataset_tars_on_the_store_as_input(moto, tmp_path):
    for i in range(2):
        write_tar(tmp_path / "wds" / f"s{i}.tar", table_as_samples(held_out_table(200, 90 + i)))
    make_bucket(moto, "tars")
    upload_dir(moto, tmp_path / "wds", "s3://tars/wds")
    data = yaml.safe_load(recipe_text(moto, create_bucket=True))
    data["input"]["columns"] = {"caption": "txt", "image_embedding": "image_emb", "text_embedding": "text_emb"}
    recipe = parse_recipe(data)
    remote = rebalance("s3://tars/wds", str(tmp_path / "from-s3"), recipe, LOCAL)
    local = rebalance(str(tmp_path / "wds"), str(tmp_path / "from-disk"), recipe, LOCAL)
    assert remote.report["rows"] == local.report["rows"] and remote.report["rows"]["manifest"] == 400
    manifest = lambda run: {k: v for k, v in local_files(run).items() if k.startswith("manifest/")}  # noqa: E731
    assert manifest(tmp_path / "from-s3") == manifest(tmp_path / "from-disk")
    again = []
    rebalance("s3://tars/wds", str(tmp_path / "from-s3"), recipe,
              RunOptions(executor="local", show_progress=False, on_progress=lambda stage, s: again.append(stage)))
    assert "scan" not in again  # the tars' fingerprints on the store match: resumed


def test_export_to_the_store_uploads_whole_files_and_open_clip_reads_the_tars(moto, tmp_path, monkeypatch):
    from mmbalance.operators.export import export_run
    from mmbalance.schemas.export import ExportOptions
    from mmbalance.synth import synth_corpus

    webdataset = pytest.importorskip("webdataset")
    synth_corpus(tmp_path / "c", rows=600, shards=3, seed=3, dim=8, images=True)
    recipe = parse_recipe({"input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
                           "attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occupation"}],
                           "balance": {"method": "cap", "by": "occupation", "cap": 40},
                           "report": {"html": False, "leakage": False}})
    rebalance(str(tmp_path / "c"), str(tmp_path / "run"), recipe, LOCAL)
    options = {"domain": {"by": "gender"}, "webdataset": {"shard_size": 150}}  # a few tars: one aws process each
    local = export_run(str(tmp_path / "run"), ["csv", "webdataset"], ExportOptions.model_validate(options))
    make_bucket(moto, "exports")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    first = moto.log_lines()
    remote = export_run(str(tmp_path / "run"), ["csv", "webdataset"],
                        ExportOptions.model_validate({**options, "dest": "s3://exports/e"}))
    time.sleep(0.5)  # the server logs a request after answering it
    requests = moto.requests(first)
    uploaded = objects(moto, "s3://exports/e")
    written = local_files(tmp_path / "run" / "export")
    data = [k for k in written if k.endswith((".tar", ".png", ".csv", "sizes.json", ".npy"))]
    assert len(data) > 40 and all(uploaded[k] == written[k] for k in data)
    assert set(uploaded) == set(written)
    for key in data:  # one request per file: a single PUT, no multipart upload, no copy or rename
        assert [r for r in requests if r.split(" ")[1].split("?")[0] == f"/exports/e/{key}"] == [f"PUT /exports/e/{key}"]
    args = remote["webdataset"]["open_clip_args"]
    urls = args[args.index("--train-data") + 1].split("::")
    assert all(u.startswith(f"pipe:aws --endpoint-url {moto.endpoint} s3 cp s3://exports/e/webdataset/") and u.endswith(" -")
               for u in urls), urls
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    samples = sum(1 for url in urls for _ in webdataset.WebDataset(url, shardshuffle=False))
    assert samples == sum(d["samples"] for d in local["webdataset"]["domains"].values())
