"""benchmarks/gpu_check.sh, the prepared GPU check, run the way CI can: small sizes on the CPU.

On a GPU machine the same script measures at full size; here it must run end to end and write every
section's figures (the embed tensor path, faiss k-means and assignment, a rebalance with embed).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_small_on_the_cpu_and_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               GPU_CHECK_LOG=str(tmp_path / "tests.log"), CUDA_VISIBLE_DEVICES="")  # the CPU run, even on a GPU machine
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--small", "--executor", "local", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["kind"] == "cpu_check" and len(result["machine"]["load_average_at_end"]) == 3
    sections = result["sections"]
    assert set(sections) == {"embed", "faiss", "rebalance"}
    assert not [name for name, s in sections.items() if "error" in s]

    embed = sections["embed"]
    assert embed["device"] == "cpu" and embed["end_to_end"]["images"] == result["sizes"]["e2e_images"]
    figures = [embed["decode"]["tensor_path_images_per_s"], embed["decode"]["pil_path_images_per_s"],
               *embed["model_only"].values(), embed["end_to_end"]["images_only"]["images_per_s"],
               embed["end_to_end"]["images_and_captions"]["images_per_s"]]
    assert len(figures) == 6 and all(math.isfinite(f) and f > 0 for f in figures)

    faiss = sections["faiss"]
    assert (faiss["n"], faiss["d"], faiss["k"], faiss["iterations"]) == (20_000, 64, 50, 10)
    assert faiss["points_trained"] == faiss["n"] and faiss["fit_seconds"] > 0 and faiss["assign_rows_per_s"] > 0
    assert faiss["on_gpu"] is False and math.isfinite(faiss["objective"])

    rebalance = sections["rebalance"]
    rows = rebalance["report_rows"]
    assert rows["input"] == result["sizes"]["rebalance_rows"] == rows["manifest"] + rows["rejected"]
    assert rows["rejected"] == 0 and rebalance["rows_per_s"] > 0 and rebalance["embed_stage_rows_per_s"] > 0
    assert rebalance["stages"]["embed"]["rows_in"] == rows["input"]
