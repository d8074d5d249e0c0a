"""The tables of benchmarks/bench_model_bias.py (benchmarks/model_bias_report.py): the same-seed
differences against a hand computation, and --update-docs writing between the markers only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import model_bias_report as report  # noqa: E402

T_975_DF2 = 4.302652729911275  # Student t, 97.5th percentile, 2 degrees of freedom (printed tables)


def _run(config: str, seed: int, ab: float, rb: float) -> dict:
    figures = {k: 0.5 for k in report.MODEL_FIGURES if k not in ("ab_null", "ab_scene_null")}
    figures.update(ab=ab, rb=rb)
    return {"config": config, "seed": seed, "evaluate": figures, "numpy": {"ab_null": 0.05, "ab_scene_null": 0.03},
            "train_seconds": 60.0}


@pytest.fixture
def runs() -> dict:
    none_ab, m4_ab = [0.30, 0.20, 0.25], [0.10, 0.25, 0.05]
    out = {f"none-s{s}": _run("none", s, ab, 0.2) for s, ab in enumerate(none_ab)}
    out |= {f"m4-s{s}": _run("m4", s, ab, 0.1) for s, ab in enumerate(m4_ab)}
    return out


def test_paired_differences_match_a_hand_computation(runs):
    paired = report.paired_differences(runs)
    assert set(paired) == {"m4"} and paired["m4"]["baseline"] == "none" and paired["m4"]["seeds"] == [0, 1, 2]
    ab = paired["m4"]["ab"]
    diffs = [-0.20, 0.05, -0.20]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    assert ab["mean"] == pytest.approx(mean, abs=1e-12)
    assert ab["ci95"] == pytest.approx([mean - T_975_DF2 * sd / 3 ** 0.5, mean + T_975_DF2 * sd / 3 ** 0.5], abs=1e-9)
    assert ab["seeds_lower"] == 2 and paired["m4"]["rb"]["seeds_lower"] == 3 and paired["m4"]["accuracy"]["seeds_lower"] == 0


def test_update_docs_writes_between_the_markers_and_nothing_else(runs, tmp_path):
    result = {"command": "python benchmarks/bench_model_bias.py --out /x", "table": report.aggregate(runs),
              "paired": report.paired_differences(runs),
              "data": {c: {"retention": 1.0, "ab_occupation": 0.4, "ab_scene": 0.1} for c in ("none", "m4")},
              "settings": {"seeds": 3, "rnb_seeds": 2, "steps": 1000, "batch_size": 64, "rows": 64000, "jobs": 2},
              "cpu_seconds": {"jobs_total": 1200.0, "driver": 60.0}, "seconds": {"total_wall": 900.0}}
    doc, readme = tmp_path / "doc.md", tmp_path / "README.md"
    doc.write_text(f"before\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    readme.write_text(f"# r\n{report.BEGIN}\n{report.END}\n## next\n")
    report.update_docs(result, doc, readme)
    once = doc.read_text(), readme.read_text()
    report.update_docs(result, doc, readme)
    assert (doc.read_text(), readme.read_text()) == once  # a rerun replaces, it does not append
    text = once[0]
    assert text.startswith(f"before\n{report.BEGIN}\n") and text.endswith(f"{report.END}\nafter\n") and "old table" not in text
    assert "| m4 | 1.00 | 0.400 | 0.100 |" in text and "wall 15.0 min" in text and "21.0 CPU-minutes" in text
    assert "`python benchmarks/bench_model_bias.py --out /x`" in once[1] and once[1].endswith(f"{report.END}\n## next\n")


def test_missing_markers_name_the_file(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("no markers here\n")
    with pytest.raises(ValueError, match="doc.md: needs one <!-- model-bias-table -->"):
        report.check_markers(doc)
