"""Real img2dataset output, downloaded from a loopback HTTP server (good images, 404s, a truncated JPEG,
an undecodable file): ``validate`` predicts ``rebalance``'s rejects exactly, img2dataset's error
messages reach the reasons, and a run over its WebDataset output equals the run over its Parquet
output row for row (by key: img2dataset writes rows in download order)."""

from __future__ import annotations

import http.server
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import tiny_open_clip_dir

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.pipeline.validate import validate_corpus
from mmbalance.schemas.recipe import parse_recipe

pytest.importorskip("img2dataset")
pytest.importorskip("open_clip")

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)
PEOPLE = ["woman", "man"]
JOBS = ["welder", "nurse", "baker", "pilot"]

DOWNLOAD = """
import sys
from img2dataset import download
if __name__ == "__main__":
    for fmt in ("parquet", "webdataset"):
        download(url_list=sys.argv[1], input_format="parquet", url_col="url", caption_col="caption",
                 output_format=fmt, output_folder=f"{sys.argv[2]}/{fmt}", processes_count=1, thread_count=4,
                 number_sample_per_shard=12, disable_all_reencoding=True, encode_format="jpg", retries=0,
                 timeout=5, enable_wandb=False, distributor="multiprocessing")
"""


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """img2dataset's parquet and webdataset outputs of 30 URLs: 25 good JPEGs (captions naming a
    person and an occupation), 3 missing (404), a truncated JPEG and an HTML page served as a JPEG."""
    root = tmp_path_factory.mktemp("i2d")
    files = {f"/img/{i}.jpg": _jpeg(i) for i in range(25)}
    files["/img/truncated.jpg"] = _jpeg(99)[:400]
    files["/img/page.jpg"] = b"<html><body>moved</body></html>"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            data = files.get(self.path)
            if data is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = [*(f"/img/{i}.jpg" for i in range(25)), "/img/gone-0.jpg", "/img/gone-1.jpg", "/img/gone-2.jpg",
             "/img/truncated.jpg", "/img/page.jpg"]
    captions = [f"a {PEOPLE[i % 2]} working as a {JOBS[(i * 7) % 4 if i < 20 else 0]}" for i in range(len(paths))]
    pq.write_table(pa.table({"url": [base + p for p in paths], "caption": captions}), root / "urls.parquet")
    (root / "download.py").write_text(DOWNLOAD)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    try:
        res = subprocess.run([sys.executable, str(root / "download.py"), str(root / "urls.parquet"), str(root)],
                             env=env, capture_output=True, text=True, timeout=400)
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (root / "webdataset").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    return root


def spec(model_dir: Path, columns: dict) -> dict:
    return {
        "input": {"columns": columns},
        "embed": {"model": f"local-dir:{model_dir}", "pretrained": "random", "batch_size": 16},
        "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"}}],
        "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
        "balance": {"method": "cap", "by": "occupation", "cap": 3},
        "report": {"leakage": False, "html": False},
    }


PARQUET_COLUMNS = {"uid": "key", "caption": "caption", "image": "jpg", "status": "status"}


def test_validate_predicts_rebalance_on_img2dataset_output(downloaded, tmp_path):
    recipe = parse_recipe(spec(tiny_open_clip_dir(tmp_path / "tiny"), PARQUET_COLUMNS))
    summary = validate_corpus(str(downloaded / "parquet"), recipe, show_progress=False)
    result = rebalance(str(downloaded / "parquet"), str(tmp_path / "o"), recipe, LOCAL)
    rows = result.report["rows"]
    assert summary["rejected_by_reason"] == rows["rejected_by_reason"] == {
        "image truncated": 1, "image undecodable": 1, "status 'failed_to_download' is not 'success'": 3}
    assert summary["rows"] == rows["input"] == 30 and summary["valid"] == rows["manifest"] == 25
    reasons = pl.read_parquet(tmp_path / "o" / "rejects" / "validate" / "*.parquet")["reason"].to_list()
    assert sorted(reasons) == ["status 'failed_to_download' is not 'success' (column 'status'): HTTP Error 404: Not Found"] * 3


def test_validate_without_a_status_mapping_counts_the_failures_and_says_why(downloaded, tmp_path):
    columns = {k: v for k, v in PARQUET_COLUMNS.items() if k != "status"}
    recipe = parse_recipe(spec(tiny_open_clip_dir(tmp_path / "tiny"), columns))
    summary = validate_corpus(str(downloaded / "parquet"), recipe, show_progress=False)
    assert summary["rejected_by_reason"] == {"image missing": 3, "image truncated": 1, "image undecodable": 1}
    assert any("3 rows" in note and "input.columns.status" in note for note in summary["notes"])


def test_webdataset_output_gives_the_run_of_the_parquet_output_row_for_row(downloaded, tmp_path):
    model_dir = tiny_open_clip_dir(tmp_path / "tiny")
    a = rebalance(str(downloaded / "parquet"), str(tmp_path / "a"), parse_recipe(spec(model_dir, PARQUET_COLUMNS)), LOCAL)
    # the tars, found from their extension; the key is the uid and status is read by default
    wds = parse_recipe(spec(model_dir, {"caption": "txt", "image": "jpg"}))
    b = rebalance(str(downloaded / "webdataset"), str(tmp_path / "b"), wds, LOCAL)
    assert b.report["rows"] == a.report["rows"] and a.report["rows"]["manifest"] == 25

    def table(run: Path, directory: str, columns: list[str]) -> pl.DataFrame:
        return pl.read_parquet(run / directory / "**" / "*.parquet").select(columns).sort("uid")

    ma, mb = (table(tmp_path / r, "manifest", ["uid", "weight"]) for r in "ab")
    assert ma.equals(mb) and ma["weight"].min() < 1.0  # the cap binds: weights differ by occupation
    ra, rb = (table(tmp_path / r, "rejects", ["uid", "stage", "reason"]) for r in "ab")
    assert ra.equals(rb) and ra.height == 5
    ea, eb = (table(tmp_path / r, "embeddings", ["uid", "image_emb", "text_emb"]) for r in "ab")
    assert ea.equals(eb)  # the same bytes reached the model
