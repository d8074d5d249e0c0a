"""The README's Quickstart, run literally as a new user would (the block as written, in a fresh
directory, with the environment's scripts on PATH): it must end with RB and AB both lower."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_quickstart_runs_literally_and_lowers_rb_and_ab(tmp_path):
    block = quickstart_block()
    assert "mmbalance recipe --example > recipe.yaml" in block and "mmbalance rebalance" in block
    (tmp_path / "quickstart.sh").write_text("set -euo pipefail\n" + block)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "quickstart.sh"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=880)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    before, after = report["before"], report["after_expected"]
    assert after["rb"] < before["rb"] and after["ab"] < before["ab"], (before["rb"], after["rb"], before["ab"], after["ab"])
    assert "warning:" not in res.stdout  # the example makes nothing worse
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "export" / "webdataset" / "train_open_clip.sh").exists()
