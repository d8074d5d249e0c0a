"""``mmbalance validate`` predicts exactly what ``rebalance`` rejects: image decode failures (checked
without loading or running the model), duplicates net of rows the embed stage rejects, img2dataset's
error messages; it says so when a status column with failures is not mapped; an embed section
without images is an error unless asked for."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from corpora import tiny_open_clip_dir, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.pipeline.validate import validate_corpus
from mmbalance.schemas.recipe import RecipeError, parse_recipe

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)


def png(seed: int, size=(24, 20)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def corpus_with_bad_images(directory):
    """Two shards: missing, empty, undecodable, truncated JPEG and PNG, an image 100x too elongated,
    a failed download with its message, duplicate uids (one whose first copy has a bad image, one whose
    second copy has), a null caption."""
    rows = []
    for s in range(2):
        for i in range(30):
            rows.append({"key": f"k{s}-{i:02d}", "caption": f"a photo {s} {i}", "jpg": png(100 * s + i),
                         "status": "success", "error_message": None, "shard": s})
    rows[1]["jpg"] = None
    rows[2]["jpg"] = b""
    rows[3]["jpg"] = b"<html>not found</html>"
    rows[4]["jpg"] = jpeg(4)[:300]
    rows[5]["jpg"] = png(5)[:60]
    rows[6]["jpg"] = png(6, size=(2, 400))
    rows[7].update(status="failed_to_download", error_message="HTTP Error 404: Not Found", jpg=None)
    rows[8]["caption"] = None
    rows[33]["key"] = rows[3]["key"]  # a duplicate of a row whose image is undecodable
    rows[34]["key"] = rows[10]["key"]  # a plain duplicate
    rows[35].update(key=rows[11]["key"], jpg=b"GIF89a garbage")  # a duplicate rejected for its image: counted once
    tables = {}
    for s in range(2):
        part = [{k: v for k, v in r.items() if k != "shard"} for r in rows if r["shard"] == s]
        tables[f"{s:05d}.parquet"] = pa.Table.from_pylist(part, schema=pa.schema([
            ("key", pa.string()), ("caption", pa.string()), ("jpg", pa.binary()), ("status", pa.string()),
            ("error_message", pa.string())]))
    return write_shards(directory, tables)


def recipe(model_dir, **columns):
    return parse_recipe({
        "input": {"columns": {"uid": "key", "caption": "caption", "image": "jpg", **columns}},
        "embed": {"model": f"local-dir:{model_dir}", "pretrained": "random", "batch_size": 16},
        "report": {"leakage": False, "html": False},
    })


def test_validate_predicts_the_rejects_of_rebalance_without_loading_the_model(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    corpus = corpus_with_bad_images(tmp_path / "c")
    spec = recipe(tiny_open_clip_dir(tmp_path / "tiny"), status="status")
    result = rebalance(str(corpus), str(tmp_path / "o"), spec, LOCAL)
    import mmbalance.operators.embed.model as embed_model

    def no_model(*args, **kwargs):
        raise AssertionError("validate loaded the model")

    monkeypatch.setattr(embed_model, "load_model", no_model)
    summary = validate_corpus(str(corpus), spec, show_progress=False)
    rows = result.report["rows"]
    assert summary["rejected_by_reason"] == rows["rejected_by_reason"]
    assert summary["rejected"] == rows["rejected"] == 10 and summary["valid"] == rows["manifest"]
    assert {"image undecodable", "image truncated", "image empty", "image too elongated", "duplicate uid",
            "status 'failed_to_download' is not 'success'"} <= set(summary["rejected_by_reason"])
    reasons = [e["reason"] for e in summary["examples"]]
    assert any(r.endswith("HTTP Error 404: Not Found") for r in reasons), reasons


def test_validate_says_so_when_a_status_column_with_failures_is_not_mapped(tmp_path):
    pytest.importorskip("open_clip")
    corpus = corpus_with_bad_images(tmp_path / "c")
    spec = recipe(tiny_open_clip_dir(tmp_path / "tiny"))
    summary = validate_corpus(str(corpus), spec, show_progress=False)
    result = rebalance(str(corpus), str(tmp_path / "o"), spec, LOCAL)
    assert summary["rejected_by_reason"] == result.report["rows"]["rejected_by_reason"]
    assert summary["rejected_by_reason"]["image missing"] == 2  # the null image and the failed download
    assert any("1 row" in n and "'status'" in n and "input.columns.status" in n for n in summary["notes"]), summary["notes"]


def test_embed_without_an_image_column_is_an_error_unless_text_only_is_asked_for(tmp_path):
    base = {"input": {"columns": {"uid": "key", "caption": "caption"}},
            "embed": {"model": "ViT-B-32", "pretrained": "random"}}
    with pytest.raises(RecipeError, match=r"input.columns.image is not set.*embed.text_only"):
        parse_recipe(base)
    text_only = parse_recipe({**base, "embed": {**base["embed"], "text_only": True}})
    assert text_only.embed.text_only
    with pytest.raises(RecipeError, match=r"concept clusters image embeddings.*text_only"):
        parse_recipe({**base, "embed": {**base["embed"], "text_only": True}, "clusters": [{"name": "concept", "k": 4}]})
