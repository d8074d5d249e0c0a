"""What the CLI prints where users read it: piped into logs and CI at 80 or 200 columns, the first
run of the demo, paths, warnings when a step made a bias figure worse, the export's train script."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmbalance.console import join_uri, regression_lines
from mmbalance.operators.report import balance_of_sizes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}

CAP_ONLY = """\
input: {columns: {uid: uid, caption: caption, image_embedding: image_emb, text_embedding: text_emb}}
attributes: [{name: gender, source: column, column: gender, values: [woman, man]}]
labels: [{name: occupation, source: column, column: occupation}]
balance: {method: cap, by: occupation, cap: 150}
report: {html: false}
"""


def mmb(*args: str, columns: int | None = None, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(env or ENV)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "mmbalance.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def check_layout(text: str, columns: int) -> None:
    """Piped output: no cell cut short, table rows within the width, sentences on one line."""
    assert "…" not in text, text
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.startswith(" ")]  # table rows and rules (tables have no vertical rules)
    assert rows and all(len(ln) <= columns for ln in rows), [ln for ln in rows if len(ln) > columns]
    for ln in lines:
        if ln.startswith("leakage "):
            assert "(majority" in ln and ln.rstrip().endswith(")") or "too few" in ln, ln


@pytest.fixture(scope="module")
def demo_local(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "d"
    res = mmb("demo", "--out", str(out), "--rows", "4000", "--shards", "3", "--executor", "local", columns=80)
    assert res.returncode == 0, res.stderr
    return out, res


def test_the_demo_says_what_it_balances_and_what_to_run_next(demo_local):
    out, res = demo_local
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert lines[0].startswith("mmbalance demo: 4,000 generated image-text rows") and "planted skew" in lines[0]
    assert "from 8% (mechanic) to 90% (nurse)" in lines[0]
    assert any(ln.startswith("- step 1: cap") for ln in lines) and any(ln.startswith("- step 2: m4") for ln in lines)
    assert lines[-1].startswith("Next: open") and "mmbalance recipe --example" in lines[-1]
    report = json.loads((out / "run" / "report.json").read_text())
    drawn = report["weights"]["distinct_rows_kept"]
    assert f"({drawn:,} drawn at least once, {4000 - drawn:,} with repeats 0)" in res.stdout
    # RB, AB and ESS are spelled out, and an ESS above the rows drawn is explained
    assert "RB, representation bias" in res.stdout and "AB, association bias" in res.stdout and "ESS, effective sample size" in res.stdout
    if report["weights"]["ess"] > report["weights"]["realized_rows"]:
        assert "counts every row with a fractional weight" in res.stdout


@pytest.mark.parametrize("columns", [80, 200])
def test_piped_output_never_wraps_a_line_and_tables_fit(demo_local, columns):
    out, res = demo_local
    if columns == 80:
        check_layout(res.stdout, 80)
        assert any(ln.startswith("RB: largest gap") and ln.rstrip().endswith("more balanced.") for ln in res.stdout.splitlines())
        assert " gender representation " in res.stdout and " gender x occupation " in res.stdout  # cells never split
    for target in (out / "run", out / "corpus"):
        shown = mmb("inspect", str(target), columns=columns)
        assert shown.returncode == 0, shown.stderr
        check_layout(shown.stdout, columns)
    shown = mmb("inspect", str(out / "run"), columns=columns).stdout
    assert "solver m4: optimal" in shown and "occupation" in shown
    assert "//" not in shown


def test_a_step_that_raises_rb_says_so_and_paths_have_one_separator(tmp_path):
    assert mmb("synth", str(tmp_path / "c"), "--rows", "6000", "--shards", "2").returncode == 0
    (tmp_path / "cap.yaml").write_text(CAP_ONLY)
    res = mmb("rebalance", str(tmp_path / "c"), "--out", f"{tmp_path}/run/", "--recipe", str(tmp_path / "cap.yaml"),
              "--executor", "local", columns=80)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["after_expected"]["rb"] > report["before"]["rb"]  # the cap made gender shares worse
    warning = next(ln for ln in res.stdout.splitlines() if ln.startswith("warning: RB rose"))
    assert f"{report['before']['rb']:.4f} -> {report['after_expected']['rb']:.4f}" in warning
    assert "cap does not hold attribute shares; add an m4 step" in warning
    assert f"{tmp_path}/run/report.html" in res.stdout and "//" not in res.stdout


def test_regression_lines_only_for_figures_that_rose_beyond_what_was_asked():
    from mmbalance.schemas.recipe import parse_recipe

    def report(rb, ab):
        return {"before": {"rb": 0.001, "ab": 0.2}, "after_expected": {"rb": rb, "ab": ab}, "method": "cap+m4"}

    recipe = parse_recipe({"attributes": [{"name": "gender", "values": ["woman", "man"]}], "labels": [{"name": "occ"}],
                           "balance": [{"method": "cap", "by": "occ", "cap": 10},
                                       {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                                        "associate": [["gender", "occ"]], "tolerance": {"representation": 0.002}}]})
    assert regression_lines(report(0.0019, 0.01), recipe) == []  # RB rose, but within the tolerance asked for
    lines = regression_lines(report(0.004, 0.3), recipe)
    assert lines[0].startswith("RB rose 0.0010 -> 0.0040: tighten the m4 step's tolerance.representation")
    assert lines[1].startswith("AB rose 0.2000 -> 0.3000")


@pytest.mark.parametrize("where, expected", [
    ("file", "exists and is a file, not a directory"),
    ("under_file", "is a file, not a directory"),
    ("proc", "cannot create the run directory there"),
])
def test_an_out_that_cannot_be_a_run_directory_is_one_line_exit_2(tmp_path, where, expected):
    assert mmb("synth", str(tmp_path / "c"), "--rows", "200", "--shards", "1").returncode == 0
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "run", "proc": Path("/proc/mmbalance-test/run")}[where]
    (tmp_path / "r.yaml").write_text(CAP_ONLY)
    res = mmb("rebalance", str(tmp_path / "c"), "--out", str(out), "--recipe", str(tmp_path / "r.yaml"), "--executor", "local")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mmbalance: error: {out}: ") and expected in lines[0], res.stderr


def test_export_writes_a_train_script_instead_of_printing_the_command(demo_local, tmp_path):
    out, _ = demo_local
    res = mmb("export", str(out / "run"), "-f", "webdataset", "--domain", "occupation", "--dest", str(tmp_path / "exp"), columns=80)
    assert res.returncode == 0, res.stderr
    assert "open_clip_train.main --train-data" not in res.stdout and max(len(ln) for ln in res.stdout.splitlines()) < 300
    script = tmp_path / "exp" / "webdataset" / "train_open_clip.sh"
    assert f"train: sh {script} --model ViT-B-32" in res.stdout
    # run it with a python that prints its arguments: the export's data arguments, then the caller's
    shim = tmp_path / "python"
    shim.write_text("#!/bin/sh\nshift 2\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    ran = subprocess.run(["sh", str(script), "--model", "ViT-B-32"], capture_output=True, text=True, env={**ENV, "PYTHON": str(shim)})
    expected = json.loads((tmp_path / "exp" / "webdataset" / "open_clip.json").read_text())["open_clip_args"]
    assert ran.returncode == 0 and ran.stdout.splitlines() == expected + ["--model", "ViT-B-32"]


def test_gini_of_equal_sizes_prints_as_zero_not_rounding_noise():
    rng = np.random.default_rng(0)
    for n in (7, 60, 463):
        size = float(rng.uniform(1, 1000))
        assert balance_of_sizes(np.full(n, size))["gini"] == 0.0


def test_join_uri_keeps_the_scheme_and_one_separator():
    assert join_uri("run/", "report.html") == "run/report.html"
    assert join_uri("/abs/run//", "manifest") == "/abs/run/manifest"
    assert join_uri("s3://bucket/run/", "report.html") == "s3://bucket/run/report.html"
    assert join_uri("/", "x") == "/x"
