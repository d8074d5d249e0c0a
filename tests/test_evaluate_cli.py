"""``mmbalance evaluate`` on the command line: bad input is one line naming what to change and exit 2;
rejected rows are accounted for; --compare pairs checkpoints; the table fits 80 columns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import TINY_OPEN_CLIP
from evaluate_sets import eval_table, model_dir, write_eval_set
from typer.testing import CliRunner

from mmbalance.cli import app

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("tiny"), TINY_OPEN_CLIP)


def run(*args):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return result.exit_code, result.output


def one_line_error(code, output):
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), output
    return lines[0]


def test_missing_image_and_attribute_columns(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=12, model_dir=tiny, samples=0)
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["image"]), path)
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o1"))
    assert "eval.parquet: missing column 'image' (the recipe maps it as image)" in line
    pq.write_table(table.drop_columns(["gender"]), path)
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o2"))
    assert "missing column 'gender' (the recipe maps it as attribute gender)" in line


@pytest.mark.parametrize("weights, expect", [
    ("checkpoint: /nonexistent/epoch_3.pt", "checkpoint file not found: /nonexistent/epoch_3.pt"),
    ("checkpoint: {bad}", "check model.name and model.checkpoint"),
])
def test_a_model_that_cannot_load(tmp_path, tiny, weights, expect):
    bad = tmp_path / "epoch_1.pt"
    bad.write_bytes(b"this is not a torch checkpoint")
    path, recipe = write_eval_set(tmp_path / "set", rows=12, model_dir=tiny, weights=weights.format(bad=bad), samples=0)
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert line.startswith(f"mmbalance: error: model: cannot load 'local-dir:{tiny}'") and expect in line


def test_an_unknown_architecture(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=12, model_dir=tiny, samples=0)
    recipe.write_text(recipe.read_text().replace(f"local-dir:{tiny}", "ViT-Nope-99"))
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert line.startswith("mmbalance: error: model: cannot load 'ViT-Nope-99'") and "ViT-Nope-99" in line[40:]


def test_an_attribute_value_without_prompts_and_an_unknown_key(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=12, model_dir=tiny, samples=0)
    text = recipe.read_text()
    recipe.write_text(text.replace("values: [woman, man]", "values: [woman, man, nonbinary]"))
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert "attributes.0: value 'nonbinary' has no prompts: add prompts.nonbinary" in line
    recipe.write_text(text.replace("bootstrap: {samples:", "bootstrap: {sample:"))
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert "unknown key 'bootstrap.sample' (did you mean 'samples'?)" in line
    # a label value found in the set that no prompt covers
    recipe.write_text(text.replace('prompts: ["a photo of a {occupation}.", "a {label} at work."]',
                                   'prompts: {nurse: [a nurse], chef: [a chef], pilot: [a pilot]}'))
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert "labels.occupation: values without prompts: ['welder']" in line


def test_no_neutral_images(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=12, model_dir=tiny, samples=0, neutral=0.0)
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "o"))
    assert "no neutral images for attribute 'gender'" in line and "column 'gender' is null" in line


def test_rejected_rows_are_accounted_and_the_table_fits_80_columns(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=30, model_dir=tiny, samples=20)
    table = eval_table(30, 0)
    uids, images, gender = table["uid"].to_pylist(), table["image"].to_pylist(), table["gender"].to_pylist()
    uids[1], uids[3], gender[5], images[7] = None, uids[2], "robot", b"\x89PNG broken"
    table = table.set_column(0, "uid", pa.array(uids, pa.string()))
    table = table.set_column(1, "image", pa.array(images, pa.binary()))
    table = table.set_column(2, "gender", pa.array(gender, pa.string()))
    pq.write_table(table, path)
    code, output = run(path, "--recipe", recipe, "--out", tmp_path / "o")
    assert code == 0, output
    doc = json.loads((tmp_path / "o" / "evaluate.json").read_text())
    ev = doc["eval"]
    assert ev["rows"] == 30 and ev["images"] == 26 and ev["rejected"] == 4
    reasons = ev["rejected_by_reason"]
    assert reasons["null uid"] == 1 and reasons["duplicate uid"] == 1 and reasons["attribute gender"] == 1
    assert reasons["image undecodable"] == 1
    table = [line for line in output.splitlines() if str(tmp_path) not in line and str(tiny) not in line]
    assert len(table) > 15 and all(len(line) <= 80 for line in table), output  # paths may be longer; the table never
    rb = [line for line in output.splitlines() if line.strip().startswith("RB")]
    assert len(rb) == 1 and rb[0].split()[1] == f"{doc['attributes']['gender']['rb']['value']:.3f}"
    assert (tmp_path / "o" / "evaluate.html").read_text().count('data-key="/attributes/gender/rb/value"') >= 1


def test_compare_pairs_checkpoints(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    import open_clip

    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{tiny}", pretrained=None)
        ckpts.append(tmp_path / f"seed{seed}.pt")
        torch.save({"epoch": 1, "state_dict": model.state_dict()}, ckpts[-1])
    path, recipe = write_eval_set(tmp_path / "set", rows=24, model_dir=tiny, samples=30)
    out = tmp_path / "cmp"
    code, output = run(path, "--recipe", recipe, "--out", out, "--compare", f"a={ckpts[0]}", f"b={ckpts[1]}", f"a_again={ckpts[0]}")
    assert code == 0, output
    doc = json.loads((out / "evaluate.json").read_text())
    assert doc["schema"] == "mmbalance.evaluate.compare/1" and doc["baseline"] == "a"
    a, b = (doc["models"][n]["result"] for n in ("a", "b"))
    assert json.loads((out / "b" / "evaluate.json").read_text()) == b
    diff = doc["differences"]["b"]["attributes"]["gender"]["rb"]
    assert diff["value"] == pytest.approx(b["attributes"]["gender"]["rb"]["value"] - a["attributes"]["gender"]["rb"]["value"])
    same = doc["differences"]["a_again"]
    assert same["labels"]["occupation"]["accuracy"] == {"value": 0.0, "ci": [0.0, 0.0]}  # paired: identical resamples
    assert a["model"]["checkpoint_sha256"] != b["model"]["checkpoint_sha256"]
    assert all(len(line) <= 80 for line in output.splitlines() if str(tmp_path) not in line), output
    assert "b vs a" in output and (out / "evaluate.html").exists() and (out / "b" / "evaluate.html").exists()
    code, output = run(path, "--recipe", recipe, "--out", tmp_path / "x", "--compare")
    assert code == 2 and "--compare needs EVAL_PATH and at least one checkpoint" in output
    assert np.isfinite(diff["value"])


def test_a_rerun_with_another_checkpoint_redoes_the_embeddings(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    import open_clip

    path, recipe = write_eval_set(tmp_path / "set", rows=16, model_dir=tiny, samples=5)
    docs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpt = tmp_path / f"s{seed}.pt"
        torch.save(open_clip.create_model(f"local-dir:{tiny}", pretrained=None).state_dict(), ckpt)
        recipe.write_text(recipe.read_text().replace("pretrained: random", f"checkpoint: {tmp_path / 's0.pt'}")
                          .replace(str(tmp_path / "s0.pt"), str(ckpt)))
        code, output = run(path, "--recipe", recipe, "--out", tmp_path / "o", "-q")
        assert code == 0, output
        docs.append(json.loads((tmp_path / "o" / "evaluate.json").read_text()))
        emb = pq.read_table(next((tmp_path / "o" / "embeddings").glob("*.parquet")))
        import hashlib

        assert docs[-1]["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        docs[-1]["_emb"] = emb.column("image_emb").to_pylist()
    assert docs[0]["_emb"] != docs[1]["_emb"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "other"))
    assert "output directory is not empty and holds no evaluation" in line
    line = one_line_error(*run(path, "--recipe", recipe, "--out", tmp_path / "set"))
    assert "the input is inside the output directory" in line


def test_without_captions_or_intervals(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=16, model_dir=tiny, samples=0, captions=False)
    code, output = run(path, "--recipe", recipe, "--out", tmp_path / "o", "--no-html")
    assert code == 0, output
    doc = json.loads((tmp_path / "o" / "evaluate.json").read_text())
    assert doc["retrieval"] is None and doc["eval"]["captions"] == 0 and not (tmp_path / "o" / "evaluate.html").exists()
    assert doc["attributes"]["gender"]["rb"]["ci"] is None and doc["attributes"]["gender"]["rb"]["value"] is not None
    assert "recall" not in output


def test_checkpoint_names():
    from mmbalance.pipeline.evaluate import model_names

    assert model_names(["logs/a/checkpoints/epoch_4.pt", "logs/b/checkpoints/epoch_4.pt", "x=/p/q.pt", "e.pt", "e.pt"]) == [
        ("a-epoch_4", "logs/a/checkpoints/epoch_4.pt"), ("b-epoch_4", "logs/b/checkpoints/epoch_4.pt"), ("x", "/p/q.pt"),
        ("e", "e.pt"), ("e-2", "e.pt")]


def test_a_rerun_reuses_the_embeddings_and_writes_the_same_bytes(tmp_path, tiny):
    path, recipe = write_eval_set(tmp_path / "set", rows=16, model_dir=tiny, samples=10)
    out = tmp_path / "o"
    assert run(path, "--recipe", recipe, "--out", out, "-q")[0] == 0
    first = (out / "evaluate.json").read_bytes()
    markers = {p.name: p.stat().st_mtime_ns for p in (out / "_done" / "embed").glob("*.json")}
    assert markers
    assert run(path, "--recipe", recipe, "--out", out, "-q")[0] == 0
    assert (out / "evaluate.json").read_bytes() == first
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_done" / "embed").glob("*.json")} == markers  # not redone
