"""The embed stage inside a run: open_clip (random-init tiny model) or DataComp .npz, then clusters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from corpora import tiny_open_clip_dir, write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import synth_corpus

LOCAL = RunOptions(executor="local", show_progress=False, html_report=False)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def _corpus_with_bad_images(directory: Path) -> Path:
    synth_corpus(directory / "src", rows=240, shards=2, seed=4, dim=8, images=True)
    tables = {}
    for i, path in enumerate(sorted((directory / "src").glob("*.parquet"))):
        t = pq.read_table(path).drop_columns(["image_emb", "text_emb"])
        images = t.column("image").to_pylist()
        images[3] = b"not an image"
        images[5] = images[5][:40]  # truncated PNG
        tables[f"s{i}.parquet"] = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    return write_shards(directory / "corpus", tables)


def _recipe(model_dir: Path, seed: int = 0) -> dict:
    return {
        "input": {"columns": {"uid": "uid", "caption": "caption", "image": "image"}},
        "embed": {"model": f"local-dir:{model_dir}", "pretrained": "random", "seed": seed, "batch_size": 16},
        "labels": [{"name": "occupation"}],
        "clusters": [{"name": "concept", "k": 3, "embedding": "mean"}],
        "sample": {"size": 200},
        "balance": {"method": "waterfill", "by": "concept", "retention": 0.7},
    }


def test_open_clip_embed_stage_feeds_clusters_and_accounts_for_bad_images(tmp_path):
    pytest.importorskip("open_clip")
    corpus = _corpus_with_bad_images(tmp_path)
    model_dir = tiny_open_clip_dir(tmp_path / "tiny")
    recipe = parse_recipe(_recipe(model_dir))
    result = rebalance(str(corpus), str(tmp_path / "o"), recipe, LOCAL)
    out = tmp_path / "o"
    assert result.report["rows"]["input"] == 240
    assert result.report["rows"]["rejected"] == 4 and result.report["rows"]["manifest"] == 236
    rejects = pl.concat([pl.read_parquet(p) for p in (out / "rejects" / "embed").glob("*.parquet")])
    assert sorted(rejects["row"].to_list()) == [3, 3, 5, 5] and set(rejects["stage"]) == {"embed"}
    side = pq.read_table(next((out / "embeddings").glob("*.parquet")))
    m = np.asarray(side.column("image_emb").combine_chunks().values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, 32)
    assert side.schema.field("image_emb").type == pa.list_(pa.float16(), 32)
    assert np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=2e-3)
    run = json.loads((out / "run.json").read_text())
    assert run["embed"]["embedding_dim"] == 32 and run["embed_identity"]["model"].startswith("local-dir:")
    manifest = pl.concat([pl.read_parquet(p) for p in sorted((out / "manifest").glob("*.parquet"))])
    assert manifest["weight"].sum() == pytest.approx(0.7 * 236, abs=1.0)
    # a rerun recomputes nothing: the embed markers are untouched
    marks = {p.name: p.stat().st_mtime_ns for p in (out / "_done" / "embed").iterdir()}
    rebalance(str(corpus), str(out), recipe, LOCAL)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_done" / "embed").iterdir()} == marks
    # other weights into the same run directory: refused, embeddings are never mixed
    with pytest.raises(InputError, match="different recipe"):
        rebalance(str(corpus), str(out), parse_recipe(_recipe(model_dir, seed=1)), LOCAL)


def test_embed_stage_through_the_cli_on_ray(tmp_path):
    pytest.importorskip("open_clip")
    corpus = _corpus_with_bad_images(tmp_path)
    recipe = _recipe(tiny_open_clip_dir(tmp_path / "tiny"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus), "--out", str(tmp_path / "o"),
                          "--recipe", str(tmp_path / "r.yaml"), "-q"], env=ENV, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["rows"]["manifest"] == 236 and "embed" in report["stage_seconds"]


def test_datacomp_npz_runs_without_torch(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        n = 150
        table = pa.table({"uid": [f"{rng.integers(0, 2**63):032x}" for _ in range(n)], "text": ["a caption"] * n})
        write_shards(tmp_path / "dc", {f"{i:08d}.parquet": table})
        img = rng.normal(size=(n, 512)).astype(np.float16)
        txt = rng.normal(size=(n, 512)).astype(np.float16)
        np.savez(tmp_path / "dc" / f"{i:08d}.npz", b32_img=img, b32_txt=txt)
    recipe = {
        "input": {"columns": {"uid": "uid", "caption": "text"}},
        "embed": {"npz": {"variant": "b32"}},
        "clusters": [{"name": "concept", "k": 4}],
        "sample": {"size": 200},
        "balance": {"method": "cap", "by": "concept", "cap": 50},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['open_clip'] = None\n"
        "from mmbalance.cli import main; sys.argv = ['mmbalance', 'rebalance', sys.argv[1], '--out', sys.argv[2],"
        " '--recipe', sys.argv[3], '--executor', 'local', '-q']; main()"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dc"), str(tmp_path / "o"), str(tmp_path / "r.yaml")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["rows"]["manifest"] == 300 and report["solution"]["values"] == 4
    assert json.loads((tmp_path / "o" / "run.json").read_text())["embed"]["embedding_dim"] == 512


def test_tensor_image_decode_in_a_run_keeps_and_rejects_the_rows_pil_does(tmp_path):
    """embed.image_decode torch (the GPU default; here on the CPU): JPEGs decoded by torchvision and
    resized as tensors, other formats through PIL. Same rows kept and rejected, for the same reasons,
    and embeddings within resize rounding of the PIL path's."""
    pytest.importorskip("open_clip")
    import io

    from PIL import Image

    src = _corpus_with_bad_images(tmp_path)
    tables = {}
    for i, path in enumerate(sorted(src.glob("*.parquet"))):
        t = pq.read_table(path)
        images = []
        for j, data in enumerate(t.column("image").to_pylist()):
            try:
                img = Image.open(io.BytesIO(data)).convert("RGB").resize((40, 30))
            except Exception:
                images.append(data)  # the bad rows stay bad
                continue
            buf = io.BytesIO()
            img.convert("CMYK" if j == 7 else "RGB").save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue()[: 300] if j == 9 else buf.getvalue())  # row 9: a truncated JPEG
        tables[path.name] = t.set_column(t.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    corpus = write_shards(tmp_path / "jpeg", tables)
    model_dir = tiny_open_clip_dir(tmp_path / "tiny")
    runs = {}
    for mode in ("pil", "torch"):
        recipe = _recipe(model_dir)
        recipe["embed"]["image_decode"] = mode
        rebalance(str(corpus), str(tmp_path / mode), parse_recipe(recipe), LOCAL)
        out = tmp_path / mode
        rejects = pl.concat([pl.read_parquet(p) for p in sorted((out / "rejects" / "embed").glob("*.parquet"))])
        side = pl.concat([pl.from_arrow(pq.read_table(p)) for p in sorted((out / "embeddings").glob("*.parquet"))])
        runs[mode] = (rejects.sort("shard", "row"), side)
    (pil_rejects, pil_side), (torch_rejects, torch_side) = runs["pil"], runs["torch"]
    assert pil_rejects.equals(torch_rejects) and sorted(pil_rejects["row"].to_list()) == [3, 3, 5, 5, 9, 9]
    assert pil_side["uid"].to_list() == torch_side["uid"].to_list() and len(pil_side) == 234
    a = np.stack(pil_side["image_emb"].to_numpy()).astype(np.float32)
    b = np.stack(torch_side["image_emb"].to_numpy()).astype(np.float32)
    assert np.abs(a - b).max() < 2e-2
