"""The one reader of image bytes (io/images.py): the column shapes a corpus holds them in, paths
relative to the shard, absolute and as URIs, and every failure as a reason; then the export reading
path-images through it as the embed stage does (the two had separate readers)."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmbalance.io.images import ImageError, ImageSource


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_rows_of_every_column_shape():
    src = ImageSource()
    structs = pa.array([{"bytes": b"a", "path": "p.png"}, None, {"bytes": None, "path": "q.png"}],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    assert src.rows(structs) == [(b"a", "p.png"), (None, None), (None, "q.png")]
    assert src.rows(pa.chunked_array([pa.array([b"x"], pa.large_binary()), pa.array([None], pa.large_binary())])) == \
        [(b"x", None), (None, None)]
    assert src.rows(pa.array(["a.png", None]).dictionary_encode()) == [(None, "a.png"), (None, None)]
    assert src.rows(pa.nulls(2)) == [(None, None), (None, None)]


def test_paths_resolve_and_read_like_the_corpus_says(tmp_path):
    shard_dir = tmp_path / "shards"
    (shard_dir / "img").mkdir(parents=True)
    data = _png(0)
    (shard_dir / "img" / "a.png").write_bytes(data)
    src = ImageSource(pafs.LocalFileSystem(), str(shard_dir))
    assert src.resolve("img/a.png") == f"{shard_dir}/img/a.png"
    assert src.resolve("/abs/a.png") == "/abs/a.png" and src.resolve("s3://b/a.png") == "s3://b/a.png"
    assert src.read(None, "img/a.png") == data  # relative to the shard's directory
    assert src.read(None, str(shard_dir / "img" / "a.png")) == data  # absolute
    assert src.read(None, (shard_dir / "img" / "a.png").as_uri()) == data  # a URI
    assert src.read(b"inline", "ignored.png") == b"inline" and src.read(None, None) is None
    with pytest.raises(ImageError) as err:
        src.read(None, "img/missing.png")
    assert err.value.reason("image") == "image not found (column 'image': img/missing.png)"
    with pytest.raises(ImageError, match="missing"):
        src.read(None, "")
    with pytest.raises(ImageError) as err:
        src.read(None, "img")  # a directory
    assert err.value.problem == "unreadable"


def test_export_reads_path_images_through_the_same_reader(tmp_path):
    from mmbalance.operators.export import export_run
    from mmbalance.pipeline.rebalance import RunOptions, rebalance
    from mmbalance.schemas.recipe import parse_recipe

    corpus = tmp_path / "corpus"
    (corpus / "img").mkdir(parents=True)
    images = {}
    for i in range(12):
        if i != 5:  # row 5 names a file that is not there
            images[f"u{i}"] = _png(i)
            (corpus / "img" / f"u{i}.png").write_bytes(images[f"u{i}"])
    table = pa.table({"uid": [f"u{i}" for i in range(12)], "caption": [f"a photo {i}" for i in range(12)],
                      "image": [f"img/u{i}.png" for i in range(12)]})
    pq.write_table(table, corpus / "part-0.parquet")
    recipe = parse_recipe({"input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
                           "report": {"html": False}, "export": {"formats": ["parquet"]}})
    rebalance(str(corpus), str(tmp_path / "run"), recipe, RunOptions(executor="local", show_progress=False))
    result = export_run(str(tmp_path / "run"), ["csv", "webdataset"])
    with open(tmp_path / "run" / "export" / "csv" / "train.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    # csv: the corpus's own paths, resolved against the shard's directory
    assert {r["uid"]: r["filepath"] for r in rows} == {f"u{i}": str(corpus / "img" / f"u{i}.png") for i in range(12)}
    # webdataset: the bytes behind each path; the missing file is skipped with its reason
    members = {}
    for tar in sorted((tmp_path / "run" / "export" / "webdataset").rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".png"):
                    members[m.name.split(".")[0].rsplit("_", 1)[0]] = t.extractfile(m).read()
    assert members == images
    assert result["webdataset"]["skipped"] == {"no image": 1}
    assert Path(tmp_path / "run" / "export" / "mixture.json").exists()
