"""report.html: numbers equal report.json, self-contained, renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmbalance.operators.html import fmt, pointer, resolve
from mmbalance.operators.report_html import write_html_report
from mmbalance.operators.report_plots import manifest_histograms
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.io.store import RunStore
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE, synth_corpus

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT_COPY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "report-screenshot.png"


def _add_bad_shard(corpus: Path) -> None:
    """A shard whose rows are rejected: 20 duplicate uids, 5 null uids, 5 missing text embeddings."""
    rows = pq.read_table(corpus / "part-00000.parquet").slice(0, 30)
    uids = rows.column("uid").to_pylist()[:20] + [None] * 5 + [f"extra-{i}" for i in range(5)]
    rows = rows.set_column(rows.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string()))
    emb = rows.column("text_emb").to_pylist()
    emb = emb[:25] + [None] * 5
    rows = rows.set_column(rows.schema.get_field_index("text_emb"), "text_emb", pa.array(emb, rows.schema.field("text_emb").type))
    pq.write_table(rows, corpus / "part-00099.parquet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report_html")
    synth_corpus(base / "corpus", 3000, 3, seed=0, dim=16, images=False)
    _add_bad_shard(base / "corpus")
    recipe = parse_recipe({**DEMO_RECIPE, "balance": {"method": "cap", "by": "occupation", "cap": 150}}, "test recipe")
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False))
    return base / "run"


@pytest.fixture(scope="module")
def rendered(run_dir) -> tuple[Path, str, dict]:
    path = Path(write_html_report(str(run_dir)))
    return path, path.read_text(encoding="utf-8"), json.loads((run_dir / "report.json").read_text())


class _Marked(HTMLParser):
    """Collects (data-key, data-value, text) of every marked number, and every src/href."""

    def __init__(self):
        super().__init__()
        self.numbers: list[tuple[str, float, str]] = []
        self.links: list[tuple[str, str, str]] = []
        self._open: list | None = None
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for attr in ("src", "href"):
            if attr in a:
                self.links.append((tag, attr, a[attr]))
        if "data-key" in a:
            self._open = [a["data-key"], float(a["data-value"]), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.numbers.append(tuple(self._open))
            self._open = None


def _parse(html_text: str) -> _Marked:
    p = _Marked()
    p.feed(html_text)
    return p


def test_numbers_in_html_equal_report_json(rendered):
    _, page, report = rendered
    marked = _parse(page).numbers
    assert len(marked) > 100
    for key, value, text in marked:
        want = resolve(report, key)
        assert value == float(want), key
        assert text == fmt(want), key
        # independent of fmt: the shown text reads back as the value to its shown precision
        shown = float(text.replace(",", ""))
        decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
        tol = 0.5 * 10**-decimals + 1e-12 if "e" not in text else abs(want) * 1e-3
        assert abs(shown - float(want)) <= tol, (key, text, want)
    keys = {k for k, _, _ in marked}
    required = [
        pointer("rows", "input"), pointer("rows", "manifest"), pointer("rows", "rejected"),
        pointer("weights", "retention"), pointer("weights", "ess"), pointer("weights", "max_repeats"),
        pointer("before", "rb"), pointer("after_expected", "rb"), pointer("after_realized", "rb"),
        pointer("before", "ab"), pointer("after_expected", "ab"),
        pointer("after_expected", "representation", "gender", "share", "woman"),
        pointer("before", "association", 0, "worst_pairs", 0, "gap"),
        pointer("after_expected", "concept_balance", "occupation", "gini"),
        pointer("after_expected", "concept_balance", "occupation", "entropy"),
        pointer("after_expected", "concept_balance", "occupation", "top1pct_share"),
        pointer("solution", "cap"),
        pointer("stage_seconds", "scan"),
    ]
    required += [pointer("rows", "rejected_by_reason", r) for r in report["rows"]["rejected_by_reason"]]
    assert not [k for k in required if k not in keys]


def test_run_has_rejects_and_accounting(rendered):
    _, page, report = rendered
    rows = report["rows"]
    assert rows["rejected"] == 30 and rows["input"] == rows["manifest"] + rows["rejected"]
    assert rows["rejected_by_reason"]["duplicate uid"] == 20
    assert "reconciles" in page and "does NOT reconcile" not in page
    assert "MISMATCH" not in page
    assert "extra-0" in page  # a rejected row shown as an example
    examples = re.findall(r"<td>(duplicate uid: first seen in [^<]*)</td>", page)
    assert 1 <= len(examples) <= 5  # a few per reason, not every rejected row


def test_manifest_histograms_reconcile(run_dir, rendered):
    _, _, report = rendered
    hist = manifest_histograms(RunStore(str(run_dir)), batch_rows=500)  # several batches per shard
    w = report["weights"]
    assert hist["rows"] == w["rows"] == report["rows"]["manifest"]
    assert hist["weight_counts"].sum() == hist["rows"]
    assert hist["repeat_counts"].sum() == hist["rows"]
    assert np.isclose(hist["weight_sum"], w["expected_rows"])
    assert hist["repeat_sum"] == w["realized_rows"]
    assert len(hist["repeat_counts"]) == w["max_repeats"] + 1


def test_self_contained(rendered):
    _, page, _ = rendered
    parsed = _parse(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    imgs = [v for t, a, v in parsed.links if t == "img"]
    assert len(imgs) >= 6
    from PIL import Image

    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    others = [v for t, a, v in parsed.links if t != "img"]
    assert all(v.startswith("#") for v in others), others
    assert not re.search(r"url\(|@import|https?://", page.split("<body>")[0])


def test_new_solution_keys_and_audit_render_generically(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "_done" / "report")  # report.json edited below: no done marker vouches for it
    report = json.loads((copy / "report.json").read_text())
    report["solution"]["duals"] = {"gender=woman": 0.25, "gender=man": -0.125}
    report["solution"]["violations"] = {"gender": {"max": 0.0031, "l1": 0.004}, "occupation": {"max": 0.5, "l1": 1.25}}
    report["solution"]["binding"] = [{"constraint": "cap occupation=teacher", "slack": 0.0}]
    report["audit"] = {"agreement": {"gender": 0.93}, "samples": {"woman": ["uid-1", "uid-2"]}}
    report["leakage"] = {"dataset": 0.61, "embedding": 0.72}
    (copy / "report.json").write_text(json.dumps(report))
    page = Path(write_html_report(str(copy))).read_text()
    keys = {k: (v, t) for k, v, t in _parse(page).numbers}
    for ptr, value in [
        (pointer("solution", "duals", "gender=woman"), 0.25),
        (pointer("solution", "violations", "occupation", "l1"), 1.25),
        (pointer("solution", "binding", 0, "slack"), 0.0),
        (pointer("audit", "agreement", "gender"), 0.93),
        (pointer("leakage", "embedding"), 0.72),
    ]:
        assert keys[ptr] == (value, fmt(value)), ptr
    assert 'id="audit"' in page and "uid-2" in page and "cap occupation=teacher" in page
    del report["audit"]
    (copy / "report.json").write_text(json.dumps(report))
    assert 'id="audit"' not in Path(write_html_report(str(copy))).read_text()


def test_unfinished_run_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no report.json"):
        write_html_report(str(tmp_path))


# -- headless Chromium ------------------------------------------------------------------------------

def _chromium(tmp: Path, url: str, *extra: str) -> str:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
    ]
    proc = subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture
def chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (Debian package 'chromium'); CI must have it")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); set CI=1 to make this a failure")
    return CHROMIUM


def test_console_error_detection_works(chromium, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><script>console.error("planted"); nosuchfn();</script></body></html>')
    messages = _console_messages(_chromium(tmp_path, bad.as_uri(), "--dump-dom"))
    assert any("planted" in m for m in messages) and any("nosuchfn" in m for m in messages)


def test_report_opens_in_chromium(chromium, rendered, tmp_path):
    path, page, _ = rendered
    stderr = _chromium(tmp_path, path.as_uri(), "--dump-dom")
    assert _console_messages(stderr) == []
    shot = path.parent / "report-screenshot.png"
    stderr = _chromium(tmp_path, path.as_uri(), "--window-size=1400,1000", f"--screenshot={shot}")
    assert _console_messages(stderr) == []
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1000, 1400)
    assert pixels.std() > 20  # blank or single-colour pages are ~0
    dark = (pixels < 128).mean()
    assert 0.02 < dark < 0.6  # header bar plus text and plots, not an all-dark error page
    print(f"\nreport screenshot: {shot}")
    if os.environ.get("MMBALANCE_SAVE_SCREENSHOT"):
        SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY)
        print(f"copied to {SCREENSHOT_COPY}")
