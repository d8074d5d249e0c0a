"""Precomputed embeddings: recipe-mapped columns and DataComp .npz files (no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from corpora import write_with_flipped_byte
from mmbalance.operators.precomputed import columns_sidecar, npz_info, npz_path_for, npz_sidecar_batches
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.embed import (
    EmbeddingMismatchError,
    NpzSpec,
    check_same_embeddings,
    info_from_schema,
)

REPO = Path(__file__).resolve().parents[2]


def unit(rng, n, d, dtype=np.float16):
    m = rng.normal(size=(n, d)).astype(np.float32)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(dtype)


def matrix(column) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def datacomp_shard(directory: Path, n: int, variant="b32", seed=0, compressed=False, stem="00000000"):
    """A DataComp-layout pair: <stem>.parquet (uid, text) and <stem>.npz (<v>_img, <v>_txt, dedup)."""
    rng = np.random.default_rng(seed)
    dim = {"b32": 512, "l14": 768}[variant]
    pq.write_table(pa.table({"uid": [f"{seed:02d}{i:06x}" for i in range(n)], "text": [f"c{i}" for i in range(n)]}),
                   directory / f"{stem}.parquet")
    arrays = {f"{variant}_img": unit(rng, n, dim), f"{variant}_txt": unit(rng, n, dim),
              "dedup": rng.normal(size=(n, 8)).astype(np.float16)}
    (np.savez_compressed if compressed else np.savez)(directory / f"{stem}.npz", **arrays)
    return directory / f"{stem}.parquet", arrays


def run_npz(path: Path, spec: NpzSpec, batch_rows=16384, **kw):
    parts = list(npz_sidecar_batches(pafs.LocalFileSystem(), str(path), path.name, spec, "uid", batch_rows, **kw))
    return pa.concat_tables([p[0] for p in parts]), pa.concat_tables([p[1] for p in parts]), len(parts)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_in_batches_and_keeps_exact_values(tmp_path, compressed):
    path, arrays = datacomp_shard(tmp_path, 23, compressed=compressed)
    sidecar, rejects, batches = run_npz(path, NpzSpec(variant="b32"), batch_rows=7)
    assert batches == 4 and rejects.num_rows == 0
    assert sidecar.column("row").to_pylist() == list(range(23))
    assert sidecar.column("uid").to_pylist() == pq.read_table(path).column("uid").to_pylist()
    assert np.array_equal(matrix(sidecar.column("image_emb")), arrays["b32_img"])  # unit already: untouched
    assert np.array_equal(matrix(sidecar.column("text_emb")), arrays["b32_txt"])
    t = sidecar.schema.field("image_emb").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == 512 and pa.types.is_float16(t.value_type)
    info = info_from_schema(sidecar.schema)
    assert info["model"] == "ViT-B-32" and info["npz"]["image_key"] == "b32_img"


def test_npz_normalises_and_rejects_bad_rows(tmp_path):
    rng = np.random.default_rng(1)
    n, dim = 6, 768
    pq.write_table(pa.table({"uid": [f"r{i}" for i in range(n)]}), tmp_path / "a.parquet")
    img = (unit(rng, n, dim, np.float32) * 3).astype(np.float16)  # not unit: renormalised
    img[2] = np.nan
    img[4] = 0
    txt = unit(rng, n, dim)
    txt[3] = np.inf
    np.savez(tmp_path / "a.npz", l14_img=img, l14_txt=txt)
    sidecar, rejects, _ = run_npz(tmp_path / "a.parquet", NpzSpec(variant="l14"))
    assert sidecar.column("row").to_pylist() == [0, 1, 3, 5]
    norms = np.linalg.norm(matrix(sidecar.column("image_emb")).astype(np.float32), axis=1)
    assert np.abs(norms - 1).max() < 2e-3
    assert sidecar.column("text_emb").is_null().to_pylist() == [False, False, True, False]
    assert sidecar.column("embed_note")[2].as_py() == "text embedding (npz 'l14_txt') holds NaN or inf"
    reasons = dict(zip(rejects.column("row").to_pylist(), rejects.column("reason").to_pylist()))
    assert reasons == {2: "image embedding (npz 'l14_img') holds NaN or inf", 4: "image embedding (npz 'l14_img') is all zeros"}
    assert rejects.column("uid").to_pylist() == ["r2", "r4"]
    # text_only keeps rows whose image embedding is unusable
    sidecar, rejects, _ = run_npz(tmp_path / "a.parquet", NpzSpec(variant="l14"), on_image_error="text_only")
    assert rejects.num_rows == 0 and sidecar.column("image_emb").null_count == 2


def test_npz_errors_are_one_line(tmp_path):
    path, arrays = datacomp_shard(tmp_path, 5)
    with pytest.raises(InputError, match=r"no array 'l14_img' \(arrays: b32_img, b32_txt, dedup\)"):
        run_npz(path, NpzSpec(variant="l14"))
    np.savez(tmp_path / "00000000.npz", b32_img=arrays["b32_img"][:4], b32_txt=arrays["b32_txt"][:4])
    with pytest.raises(InputError, match=r"\[b32_img\]: 4 rows, but 00000000.parquet has 5"):
        run_npz(path, NpzSpec(variant="b32"))
    np.savez(tmp_path / "00000000.npz", b32_img=arrays["b32_img"][:, :256], b32_txt=arrays["b32_txt"])
    with pytest.raises(InputError, match="dimension 256, expected 512"):
        run_npz(path, NpzSpec(variant="b32"))
    (tmp_path / "00000000.npz").unlink()
    with pytest.raises(InputError, match="no embeddings file 00000000.npz beside the shard"):
        run_npz(path, NpzSpec(variant="b32"))
    (tmp_path / "00000000.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not an .npz file"):
        run_npz(path, NpzSpec(variant="b32"))
    (tmp_path / "00000000.npz").write_bytes(b"PK" + b"x" * 200)
    with pytest.raises(InputError, match="not an .npz file") as err:
        run_npz(path, NpzSpec(variant="b32"))
    assert "\n" not in str(err.value)


def test_npz_verifies_the_shard_page_checksums_on_request(tmp_path):
    """execution.verify_checksums: a flipped byte in a data page of the uid column beside the .npz is
    a one-line input error naming the shard; unverified (the default) the uids come as read."""
    path, _ = datacomp_shard(tmp_path, 9)
    table = pq.read_table(path)
    write_with_flipped_byte(path, table, "uid")
    with pytest.raises(InputError, match=r"^00000000\.parquet: unreadable data \(.*CRC") as err:
        run_npz(path, NpzSpec(variant="b32"), batch_rows=4, verify_checksums=True)
    assert "\n" not in str(err.value)
    sidecar, rejects, batches = run_npz(path, NpzSpec(variant="b32"), batch_rows=4)
    assert batches == 3 and rejects.num_rows == 0
    uids = sidecar.column("uid").to_pylist()
    assert uids == pq.read_table(path).column("uid").to_pylist() and uids != table.column("uid").to_pylist()


def test_custom_keys_and_paths(tmp_path):
    assert npz_path_for("s3b/dir/x.y.parquet") == "s3b/dir/x.y.npz"
    assert npz_path_for("x.parquet", ".emb.npz") == "x.emb.npz"
    rng = np.random.default_rng(2)
    pq.write_table(pa.table({"uid": ["a", "b"]}), tmp_path / "x.parquet")
    np.savez(tmp_path / "x.npz", img=unit(rng, 2, 512), txt=unit(rng, 2, 512))
    sidecar, _, _ = run_npz(tmp_path / "x.parquet", NpzSpec(variant="b32", image_key="img", text_key="txt"))
    assert sidecar.num_rows == 2


def test_columns_sidecar_list_and_fixed_size(tmp_path):
    rng = np.random.default_rng(3)
    img = unit(rng, 4, 16, np.float32) * 2
    txt = unit(rng, 4, 16)
    table = pa.table({
        "uid": pa.array([1, 2, 3, 4], pa.int64()),
        "ie": pa.array([list(r) for r in img], pa.list_(pa.float32())),
        "te": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), 16, mask=pa.array([False, True, False, False])),
    })
    sidecar, rejects = columns_sidecar(table, "uid", "ie", "te", 16, shard="s", row_offset=10)
    assert rejects.num_rows == 0 and sidecar.column("row").to_pylist() == [10, 11, 12, 13]
    assert sidecar.column("uid").to_pylist() == ["1", "2", "3", "4"]
    m = matrix(sidecar.column("image_emb")).astype(np.float32)
    assert np.abs(np.linalg.norm(m, axis=1) - 1).max() < 2e-3
    assert np.allclose(m, img / 2, atol=2e-3)
    assert sidecar.column("text_emb").is_null().to_pylist() == [False, True, False, False]
    assert sidecar.column("embed_note")[1].as_py() == "text embedding (column 'te') is null"
    assert np.array_equal(matrix(sidecar.column("text_emb"))[[0, 2, 3]], txt[[0, 2, 3]])
    # image-only corpora (no text column mapped) keep every row
    sidecar, rejects = columns_sidecar(table, "uid", "ie", None, 16)
    assert sidecar.num_rows == 4 and sidecar.column("text_emb").null_count == 4 and rejects.num_rows == 0


def test_identity_matches_open_clip_tag_and_refuses_other_variant():
    l14 = npz_info(NpzSpec(variant="l14"))
    tagged = {"model": "ViT-L-14", "pretrained": "openai", "pretrained_kind": "tag", "checkpoint_sha256": "ab" * 32,
              "embedding_dim": 768, "precision": "amp"}
    check_same_embeddings(l14, tagged, "run.json", "embeddings/x.parquet")
    with pytest.raises(EmbeddingMismatchError) as err:
        check_same_embeddings(l14, npz_info(NpzSpec(variant="b32")), "run.json", "embeddings/x.parquet")
    msg = str(err.value)
    assert "\n" not in msg and "ViT-B-32 [tag:openai] 512-d" in msg and "ViT-L-14 [tag:openai] 768-d" in msg


def test_npz_path_works_without_torch(tmp_path):
    """Block torch at import: the npz path and the image decoder still work; the model path says why not."""
    datacomp_shard(tmp_path, 9, variant="l14")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        import json
        import pyarrow.fs as pafs
        from mmbalance.operators import precomputed
        from mmbalance.operators.embed import images, model
        from mmbalance.schemas.embed import EmbedSpec, NpzSpec
        parts = list(precomputed.npz_sidecar_batches(pafs.LocalFileSystem(), {str(tmp_path / '00000000.parquet')!r},
                                                     "00000000.parquet", NpzSpec(variant="l14"), "uid", 4))
        import io
        from PIL import Image
        buf = io.BytesIO(); Image.new("CMYK", (5, 4)).save(buf, format="JPEG")
        mode = images.decode_image(buf.getvalue()).mode
        try:
            model.load_model(EmbedSpec(pretrained="random"))
            err = None
        except ImportError as e:
            err = str(e)
        print(json.dumps({{"rows": sum(p[0].num_rows for p in parts), "batches": len(parts), "mode": mode,
                           "err": err, "loaded": sorted(m for m in ("torch", "open_clip", "torchvision")
                                                         if sys.modules.get(m) is not None)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 9 and result["batches"] == 3 and result["mode"] == "RGB"
    assert result["loaded"] == []
    assert result["err"].startswith("embedding with a model needs torch and open_clip (pip install 'mmbalance[embed]')")
