"""The open_clip embed operator on a tiny random-init model (no downloads, no Ray cluster)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("open_clip")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmbalance.operators.embed import (  # noqa: E402
    REJECT_REASON,
    EmbedColumns,
    ImageError,
    ImageSource,
    decode_image,
    embed_shard,
    embed_table,
    load_model,
)
from corpora import TINY_OPEN_CLIP, write_with_flipped_byte  # noqa: E402

from mmbalance.schemas.contract import InputError  # noqa: E402
from mmbalance.schemas.embed import (  # noqa: E402
    EmbeddingMismatchError,
    EmbedSpec,
    check_same_embeddings,
    info_from_schema,
)

TINY = TINY_OPEN_CLIP  # 2-layer, 64-wide towers, 32 px images: random init in milliseconds
COLS = EmbedColumns(uid="uid", image="image", caption="caption")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "open_clip_config.json").write_text(json.dumps(TINY))
    return d


def tiny_spec(tiny_dir, **kw) -> EmbedSpec:
    return EmbedSpec(model=f"local-dir:{tiny_dir}", pretrained=kw.pop("pretrained", "random"), batch_size=4, **kw)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return load_model(tiny_spec(tiny_dir))


def picture(seed: int, size=(48, 36)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 5, y * 7, (x + y) * 3], -1) % 256
    return (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt="PNG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format=fmt, **save)
    return buf.getvalue()


def matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def table_of(images, captions, type_=pa.binary()):
    return pa.table({"uid": [f"u{i}" for i in range(len(images))], "image": pa.array(images, type_),
                     "caption": pa.array(captions, pa.string())})


def test_unit_norm_float16_fixed_size_and_metadata(bundle):
    images = [encode(picture(i)) for i in range(6)] + [encode(picture(9), "JPEG", quality=90)]
    table = table_of(images, [f"photo number {i}" for i in range(7)])
    sidecar, rejects = embed_table(table, bundle, COLS, shard="s0", row_offset=100)
    assert rejects.num_rows == 0
    assert sidecar.column("row").to_pylist() == list(range(100, 107))
    for name in ("image_emb", "text_emb"):
        t = sidecar.schema.field(name).type
        assert pa.types.is_fixed_size_list(t) and t.list_size == 32 and pa.types.is_float16(t.value_type)
        m = matrix(sidecar.column(name)).astype(np.float32)
        assert np.abs(np.linalg.norm(m, axis=1) - 1).max() < 2e-3
        assert len(np.unique(m.round(3), axis=0)) == 7  # distinct inputs, distinct embeddings
    info = info_from_schema(sidecar.schema)
    assert info["embedding_dim"] == 32 and info["pretrained_kind"] == "random"
    assert info["open_clip_version"] and info["torch_version"] == torch.__version__


def test_deterministic_for_seed_and_distinct_across_seeds(tiny_dir, bundle):
    table = table_of([encode(picture(i)) for i in range(5)], [f"caption {i}" for i in range(5)])
    a, _ = embed_table(table, bundle, COLS)
    again = load_model(tiny_spec(tiny_dir))
    b, _ = embed_table(table, again, COLS)
    assert again.info["weights_sha256"] == bundle.info["weights_sha256"]
    assert a.column("image_emb").equals(b.column("image_emb")) and a.column("text_emb").equals(b.column("text_emb"))
    other = load_model(tiny_spec(tiny_dir, seed=1))
    c, _ = embed_table(table, other, COLS)
    assert other.info["weights_sha256"] != bundle.info["weights_sha256"]
    assert not np.allclose(matrix(a.column("image_emb")), matrix(c.column("image_emb")), atol=1e-2)
    with pytest.raises(EmbeddingMismatchError, match="refusing to mix embeddings"):
        check_same_embeddings(bundle.info, other.info, "run.json", "embeddings/x.parquet")
    check_same_embeddings(bundle.info, {**again.info, "precision": "fp16", "device": "cuda"}, "a", "b")


def test_checkpoint_file_and_local_dir_weights_give_same_embeddings(tmp_path, tiny_dir, bundle):
    table = table_of([encode(picture(i)) for i in range(5)], [f"caption {i}" for i in range(5)])
    ref, _ = embed_table(table, bundle, COLS)
    ckpt = tmp_path / "tiny.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    by_path = load_model(tiny_spec(tiny_dir, pretrained=str(ckpt)))
    got, _ = embed_table(table, by_path, COLS)
    assert got.column("image_emb").equals(ref.column("image_emb"))
    assert got.column("text_emb").equals(ref.column("text_emb"))
    assert by_path.info["pretrained_kind"] == "file"
    assert by_path.info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()

    # a local-dir holding config + weights (open_clip's layout), no pretrained given
    from safetensors.torch import save_file

    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "open_clip_config.json").write_text(json.dumps(TINY))
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, packed / "open_clip_model.safetensors")
    from_dir = load_model(EmbedSpec(model=f"local-dir:{packed}", batch_size=4))
    got2, _ = embed_table(table, from_dir, COLS)
    assert got2.column("image_emb").equals(ref.column("image_emb"))
    assert from_dir.info["pretrained_kind"] == "local-dir"
    assert from_dir.info["checkpoint_sha256"] == hashlib.sha256((packed / "open_clip_model.safetensors").read_bytes()).hexdigest()
    # file-identified weights differ from the random init's identity even with equal values
    with pytest.raises(EmbeddingMismatchError):
        check_same_embeddings(bundle.info, by_path.info, "run.json", "new")


def test_open_clip_tag_path_offline(tmp_path, tiny_dir, bundle, monkeypatch):
    import open_clip
    import open_clip.factory as factory
    import open_clip.pretrained as pretrained

    cfg = tmp_path / "cfgs" / "mmb-tiny.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY["model_cfg"]))
    ckpt = tmp_path / "tag.pt"
    torch.save(bundle.model.state_dict(), ckpt)
    # registry changes are undone after the test (add_model_config rebinds _MODEL_CONFIGS)
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(cfg.parent)
    # a registry entry whose download resolves to a local file: the real tag code path, offline
    monkeypatch.setitem(pretrained._PRETRAINED, "mmb-tiny", {"testtag": {"file": str(ckpt), "quick_gelu": False}})
    tagged = load_model(EmbedSpec(model="mmb-tiny", pretrained="testtag", batch_size=4))
    assert tagged.info["pretrained_kind"] == "tag"
    assert tagged.info["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    table = table_of([encode(picture(3))], ["a tagged model"])
    a, _ = embed_table(table, tagged, COLS)
    b, _ = embed_table(table, bundle, COLS)
    assert a.column("image_emb").equals(b.column("image_emb"))
    with pytest.raises(ValueError, match="not an open_clip tag of 'mmb-tiny'.*testtag"):
        load_model(EmbedSpec(model="mmb-tiny", pretrained="nosuchtag"))


def test_preprocessing_matches_open_clip_transform(bundle):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(bundle.model)), is_train=False)
    imgs = [Image.fromarray(picture(i, size)) for i, size in enumerate([(48, 36), (31, 77), (200, 33), (32, 32)])]
    theirs = torch.stack([transform(im) for im in imgs])
    ours = np.stack([bundle.preprocessor.pixels(im) for im in imgs])
    x = torch.from_numpy(ours).permute(0, 3, 1, 2).float().div(255)
    x = x.sub_(torch.tensor(bundle.preprocessor.mean).view(1, 3, 1, 1)).div_(torch.tensor(bundle.preprocessor.std).view(1, 3, 1, 1))
    assert torch.equal(x, theirs)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(bundle.model.encode_image(theirs), dim=-1).numpy()
    got = bundle.encode_images(ours).astype(np.float32)
    assert np.abs(got - want).max() < 2e-3


def test_image_failures_become_reasons(tiny_dir, bundle):
    good = encode(picture(1))
    png = encode(picture(2))
    images = [good, b"", b"not an image at all", png[: len(png) // 2], None, encode(picture(3), "JPEG")[:200]]
    sidecar, rejects = embed_table(table_of(images, ["c"] * 6), bundle, COLS, shard="s")
    assert sidecar.column("row").to_pylist() == [0]
    reasons = dict(zip(rejects.column("row").to_pylist(), rejects.column("reason").to_pylist()))
    assert reasons[1].startswith("image empty (column 'image'")
    assert reasons[2].startswith("image undecodable (column 'image'")
    assert reasons[3].split(" (")[0] in ("image truncated", "image undecodable")
    assert reasons[4].startswith("image missing")
    assert reasons[5].split(" (")[0] in ("image truncated", "image undecodable")
    assert set(rejects.column("stage").to_pylist()) == {"embed"}
    assert rejects.column("uid").to_pylist() == ["u1", "u2", "u3", "u4", "u5"]
    # decompression-bomb guard: pixels are counted from the header, before decoding
    small = load_model(tiny_spec(tiny_dir, max_image_pixels=1000))
    _, rej = embed_table(table_of([encode(picture(1, (48, 36)))], ["c"]), small, COLS)
    assert rej.column("reason")[0].as_py().startswith("image too large (column 'image': 48x36 is over 1000")
    # a 1x4000 strip would resize to 32x128000 pixels on its short side: refused before resizing
    strip = encode(np.zeros((4000, 1, 3), np.uint8))
    _, rej = embed_table(table_of([strip, encode(picture(1, (640, 20)))], ["c", "c"]), bundle, COLS)
    assert rej.column("row").to_pylist() == [0]
    assert rej.column("reason")[0].as_py() == "image too elongated (column 'image': 1x4000)"
    with pytest.raises(ImageError) as err:
        decode_image(encode(np.zeros((1, 1, 3), np.uint8))[:30])
    assert err.value.problem in ("truncated", "undecodable")


def test_modes_and_formats_convert_to_rgb(bundle):
    arr = picture(4)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 128, np.uint8)])
    frames = [Image.fromarray(picture(5)).convert("P"), Image.fromarray(picture(6)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gif = buf.getvalue()
    i16 = io.BytesIO()
    Image.fromarray((arr[..., 0].astype(np.uint16) * 257)).save(i16, format="PNG")
    rgba_png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(rgba_png, format="PNG")
    images = {
        "jpeg_cmyk": encode(arr, "JPEG", "CMYK"),
        "png_l": encode(arr, "PNG", "L"),
        "png_rgba": rgba_png.getvalue(),
        "png_p": encode(arr, "PNG", "P"),
        "webp": encode(arr, "WEBP", lossless=True),
        "gif": gif,
        "png_i16": i16.getvalue(),
    }
    for name, data in images.items():
        img = decode_image(data)
        assert img.mode == "RGB", name
    assert Image.open(io.BytesIO(images["png_i16"])).mode.startswith("I")
    assert np.array_equal(np.asarray(decode_image(images["png_i16"]))[..., 0], arr[..., 0])
    # GIF: the first frame, as its own still image
    first = io.BytesIO()
    frames[0].save(first, format="GIF")
    table = table_of([gif, first.getvalue(), *images.values()], ["c"] * (2 + len(images)))
    sidecar, rejects = embed_table(table, bundle, COLS)
    assert rejects.num_rows == 0
    m = matrix(sidecar.column("image_emb"))
    assert np.array_equal(m[0], m[1])


def test_text_only_and_missing_caption_policies(tiny_dir, bundle):
    images = [encode(picture(1)), b"broken", encode(picture(2)), b"broken"]
    captions = ["kept", "text survives", None, None]
    keep_text = load_model(tiny_spec(tiny_dir, on_image_error="text_only"))
    sidecar, rejects = embed_table(table_of(images, captions), keep_text, COLS)
    assert sidecar.column("row").to_pylist() == [0, 1, 2]
    assert sidecar.column("image_emb").is_null().to_pylist() == [False, True, False]
    assert sidecar.column("text_emb").is_null().to_pylist() == [False, False, True]
    notes = sidecar.column("embed_note").to_pylist()
    assert notes[0] is None and notes[1].startswith("image undecodable") and notes[2].startswith("caption missing")
    assert rejects.column("row").to_pylist() == [3]  # neither half: always rejected
    assert "caption missing" in rejects.column("reason")[0].as_py()
    # the text-only row's text embedding is the caption's
    alone = bundle.encode_texts(["text survives"])
    assert np.array_equal(matrix(sidecar.column("text_emb"))[1], alone[0])

    strict = load_model(tiny_spec(tiny_dir, on_missing_caption="reject"))
    sidecar, rejects = embed_table(table_of(images[:3], ["ok", "x", "   "]), strict, COLS)
    assert sidecar.column("row").to_pylist() == [0]
    reasons = rejects.column("reason").to_pylist()
    assert reasons[0].startswith("image undecodable") and reasons[1].startswith("caption empty")


def test_long_captions_are_truncated_like_open_clip(bundle):
    words = [f"word{i}" for i in range(400)]
    long_a, long_b = " ".join(words[:300]), " ".join(words)
    tokens = bundle.tokenize([long_a, "short"])
    assert tokens.shape == (2, 77) and tokens[0, -1].item() == bundle.tokenizer.eot_token_id
    emb = bundle.encode_texts([long_a, long_b, " ".join(words[:5])])
    assert np.array_equal(emb[0], emb[1])  # identical once truncated to the context
    assert not np.array_equal(emb[0], emb[2])


def test_struct_and_path_columns(tmp_path, bundle):
    blobs = [encode(picture(i)) for i in range(3)]
    (tmp_path / "imgs").mkdir()
    for i, b in enumerate(blobs):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(b)
    ref, _ = embed_table(table_of(blobs, ["a", "b", "c"]), bundle, COLS)
    struct = pa.array(
        [{"bytes": blobs[0], "path": "ignored.png"}, {"bytes": None, "path": "imgs/1.png"},
         {"bytes": None, "path": str(tmp_path / "imgs" / "2.png")}, {"bytes": None, "path": "imgs/missing.png"}, None],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"uid": list("vwxyz"), "image": struct, "caption": ["a", "b", "c", "d", "e"]})
    sidecar, rejects = embed_table(table, bundle, COLS, source=ImageSource(base=str(tmp_path)))
    assert sidecar.column("row").to_pylist() == [0, 1, 2]
    assert sidecar.column("image_emb").equals(ref.column("image_emb"))
    reasons = rejects.column("reason").to_pylist()
    assert reasons[0].startswith("image not found (column 'image': imgs/missing.png")
    assert reasons[1].startswith("image missing")
    # plain string paths, one as a file:// URI
    paths = pa.array(["imgs/0.png", f"file://{tmp_path}/imgs/1.png", "imgs/2.png"], pa.string())
    table = pa.table({"uid": list("abc"), "image": paths, "caption": ["a", "b", "c"]})
    sidecar, rejects = embed_table(table, bundle, COLS, source=ImageSource(base=str(tmp_path)))
    assert rejects.num_rows == 0 and sidecar.column("image_emb").equals(ref.column("image_emb"))
    # a scheme pyarrow lacks goes through fsspec
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    mem.pipe("/mmb-test/0.png", blobs[0])
    table = pa.table({"uid": ["m", "n"], "image": ["memory://mmb-test/0.png", "memory://mmb-test/gone.png"],
                      "caption": ["a", "b"]})
    sidecar, rejects = embed_table(table, bundle, COLS)
    mem.rm("/mmb-test", recursive=True)
    assert sidecar.column("image_emb").combine_chunks().equals(ref.column("image_emb").combine_chunks().slice(0, 1))
    assert rejects.column("reason")[0].as_py().startswith("image not found (column 'image': memory://mmb-test/gone.png")


def test_embed_shard_streams_batches(tmp_path, bundle):
    import pyarrow.fs as pafs

    n = 11
    images = [encode(picture(i)) for i in range(n)]
    images[6] = b"\x89PNG\r\n\x1a\n broken"
    table = table_of(images, [f"cap {i}" for i in range(n)])
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=4)
    timings = {}
    parts = list(embed_shard(pafs.LocalFileSystem(), str(path), "shard.parquet", bundle, COLS, batch_rows=4,
                             timings=timings))
    assert len(parts) == 3
    sidecar = pa.concat_tables([p[0] for p in parts])
    rejects = pa.concat_tables([p[1] for p in parts])
    assert sidecar.column("row").to_pylist() == [i for i in range(n) if i != 6]
    assert rejects.column("row").to_pylist() == [6] and rejects.column("shard")[0].as_py() == "shard.parquet"
    whole, _ = embed_table(table, bundle, COLS)
    assert np.abs(matrix(sidecar.column("image_emb")).astype(np.float32)
                  - matrix(whole.column("image_emb")).astype(np.float32)).max() < 2e-3
    assert timings["images"] == n and timings["captions"] == n and timings["image_model"] > 0
    # only the rows validation kept (here 1, 2, 9, 10): other batches are skipped
    keep = np.array([1, 2, 9, 10])
    parts = list(embed_shard(pafs.LocalFileSystem(), str(path), "shard.parquet", bundle, COLS, batch_rows=4,
                             only_rows=keep))
    assert len(parts) == 2
    sub = pa.concat_tables([p[0] for p in parts])
    assert sub.column("row").to_pylist() == [1, 2, 9, 10]
    assert sub.column("uid").to_pylist() == ["u1", "u2", "u9", "u10"]
    assert np.abs(matrix(sub.column("image_emb")).astype(np.float32)
                  - matrix(whole.column("image_emb")).astype(np.float32)[[1, 2, 8, 9]]).max() < 2e-3


def test_embed_shard_verifies_page_checksums_on_request(tmp_path, bundle):
    """execution.verify_checksums: a flipped byte in a data page of the image column is a one-line
    input error naming the shard; unverified (the default) the shard embeds as read, flip and all."""
    import pyarrow.fs as pafs

    n = 5
    table = table_of([encode(picture(i)) for i in range(n)], [f"cap {i}" for i in range(n)])
    path = tmp_path / "shard.parquet"
    write_with_flipped_byte(path, table, "image")
    fs = pafs.LocalFileSystem()
    with pytest.raises(InputError, match=r"^shard\.parquet: unreadable data \(.*CRC") as err:
        list(embed_shard(fs, str(path), "shard.parquet", bundle, COLS, batch_rows=4, verify_checksums=True))
    assert "\n" not in str(err.value)
    parts = list(embed_shard(fs, str(path), "shard.parquet", bundle, COLS, batch_rows=4))
    sidecar = pa.concat_tables([p[0] for p in parts])
    rejects = pa.concat_tables([p[1] for p in parts])
    as_read, as_read_rejects = embed_table(pq.read_table(path), bundle, COLS, shard="shard.parquet")
    assert sidecar.column("row").to_pylist() == as_read.column("row").to_pylist()
    assert rejects.column("reason").to_pylist() == as_read_rejects.column("reason").to_pylist()
    assert np.abs(matrix(sidecar.column("image_emb")).astype(np.float32)
                  - matrix(as_read.column("image_emb")).astype(np.float32)).max() < 2e-3


def test_jpeg_draft_decodes_smaller(tiny_dir):
    draft = load_model(tiny_spec(tiny_dir, jpeg_draft=True))
    big = encode(picture(7, (400, 300)), "JPEG", quality=92)
    full = decode_image(big)
    small = decode_image(big, draft=draft.preprocessor.draft_size)
    assert full.size == (400, 300) and small.size[0] < 400 and min(small.size) >= 32
    a = draft.preprocessor.pixels(full).astype(np.float32)
    b = draft.preprocessor.pixels(small).astype(np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 12
    assert draft.preprocessor.draft_size(20, 20) is None  # never upsampled


def test_spec_rules_and_cpu_fallback(tiny_dir):
    with pytest.raises(ValueError, match="pretrained is required"):
        EmbedSpec(model="ViT-B-32")
    with pytest.raises(ValueError, match="num_gpus is 0"):
        EmbedSpec(model="ViT-B-32", pretrained="random", device="cuda")
    with pytest.raises(ValueError, match="extra"):
        EmbedSpec.model_validate({"model": "ViT-B-32", "pretrained": "random", "batchsize": 3})
    if not torch.cuda.is_available():
        fallback = load_model(tiny_spec(tiny_dir, num_gpus=1))
        assert fallback.device == "cpu" and fallback.info["precision"] == "fp32"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_model(tiny_spec(tiny_dir, num_gpus=1, device="cuda"))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_model(tiny_spec(tiny_dir, pretrained="/nonexistent/ckpt.pt"))


def test_trimmed_text_tower_matches_full_context(bundle):
    assert bundle.trim_text and bundle.info["trim_text"]
    captions = ["a", "a photo of a dog", " ".join(["long"] * 60), "two words", " ".join(["w"] * 200)] * 9
    tokens = bundle.tokenize(captions)
    got = bundle.encode_tokens(tokens).astype(np.float32)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(bundle.model.encode_text(tokens), dim=-1).numpy()
    assert np.abs(got - want).max() < 2e-3
    bundle.trim_text = False
    try:
        full = bundle.encode_tokens(tokens).astype(np.float32)
    finally:
        bundle.trim_text = True
    assert np.abs(full - want).max() < 2e-3


# -- the tensor path (image_decode: torch): torchvision decode + tensor resize, here on the CPU --------


def mixed_images() -> dict[str, bytes | None]:
    """Every route through the tensor path: JPEGs it decodes, formats it hands to PIL, rows it rejects."""
    arr = picture(11, (120, 90))
    frames = [Image.fromarray(picture(12)).convert("P"), Image.fromarray(picture(13)).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    jpeg = encode(arr, "JPEG", quality=90)
    return {
        "jpeg": jpeg,
        "jpeg_portrait": encode(picture(14, (50, 130)), "JPEG", quality=85),
        "jpeg_progressive": encode(picture(15, (90, 70)), "JPEG", quality=80, progressive=True),
        "jpeg_grey": encode(arr, "JPEG", "L"),
        "jpeg_small": encode(picture(16, (20, 24)), "JPEG"),  # upsampled to the model size
        "jpeg_cmyk": encode(arr, "JPEG", "CMYK"),
        "png": encode(arr, "PNG"),
        "webp": encode(arr, "WEBP", lossless=True),
        "gif": gif.getvalue(),
        "jpeg_truncated": jpeg[: len(jpeg) // 2],
        "jpeg_header_only": jpeg[:200],
        "junk": b"not an image",
        "empty": b"",
        "null": None,
        "elongated": encode(np.zeros((4000, 1, 3), np.uint8), "JPEG"),
    }


def test_tensor_geometry_matches_open_clip_pil_transform():
    import dataclasses

    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.io import ImageReadMode, decode_jpeg

    from mmbalance.operators.embed import Preprocessor

    for cfg in (PreprocessCfg(size=224), PreprocessCfg(size=(160, 192), resize_mode="squash")):
        pre = Preprocessor(dataclasses.asdict(cfg))
        assert pre.tensor_geometry is not None
        steps = image_transform_v2(cfg, is_train=False).transforms[:-2]  # open_clip's own, PIL in, PIL out
        for i, size in enumerate([(640, 480), (333, 500), (224, 224), (100, 60), (1000, 260)]):
            data = encode(picture(20 + i, size), "JPEG", quality=90)
            want = Image.open(io.BytesIO(data))
            for step in steps:
                want = step(want)
            want = np.asarray(want, np.int16)
            got = pre.resize_tensor(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
            got = got.permute(1, 2, 0).numpy().astype(np.int16)
            assert got.shape == want.shape
            # same decoder (libjpeg-turbo, identical pixels); the resize is torchvision's bicubic kernel vs
            # PIL's: within a level almost everywhere, a few levels at this picture's sharp noisy edges
            diff = np.abs(got - want)
            assert diff.mean() < 0.3 and (diff > 2).mean() < 0.005 and diff.max() <= 10, (cfg, size, diff.max(), diff.mean())
    longest = Preprocessor(dataclasses.asdict(PreprocessCfg(size=224, resize_mode="longest")))
    assert longest.tensor_geometry is None  # open_clip's ResizeKeepRatio is PIL-only


def test_tensor_path_on_cpu_gives_pil_path_rows_reasons_and_embeddings(tiny_dir, bundle):
    images = mixed_images()
    table = table_of(list(images.values()), ["a caption"] * len(images))
    tensor = load_model(tiny_spec(tiny_dir, image_decode="torch"))
    assert tensor.image_decode == "torch" and bundle.image_decode == "pil"  # auto on the CPU: PIL
    timings: dict = {}
    got, got_rej = embed_table(table, tensor, COLS, shard="s", timings=timings)
    want, want_rej = embed_table(table, bundle, COLS, shard="s")
    assert got.column("row").equals(want.column("row")) and got_rej.equals(want_rej)
    names = list(images)
    assert [names[r] for r in got.column("row").to_pylist()] == [
        "jpeg", "jpeg_portrait", "jpeg_progressive", "jpeg_grey", "jpeg_small", "jpeg_cmyk", "png", "webp", "gif"]
    a, b = matrix(got.column("image_emb")).astype(np.float32), matrix(want.column("image_emb")).astype(np.float32)
    pil_rows = [i for i, r in enumerate(got.column("row").to_pylist()) if not names[r].startswith("jpeg") or names[r] == "jpeg_cmyk"]
    assert np.array_equal(a[pil_rows], b[pil_rows])  # formats the tensor path hands to PIL: the same pixels
    assert np.abs(a - b).max() < 1e-2  # JPEGs: a level or two of resize difference through a random model
    assert got.column("text_emb").equals(want.column("text_emb"))
    assert timings["images"] == len(images)


def test_image_decode_rules(tiny_dir):
    with pytest.raises(ValueError, match="jpeg_draft is a PIL decode option"):
        EmbedSpec(model="ViT-B-32", pretrained="random", image_decode="torch", jpeg_draft=True)
    assert load_model(tiny_spec(tiny_dir, image_decode="auto", jpeg_draft=True)).image_decode == "pil"
    longest = json.loads(json.dumps(TINY))
    longest["preprocess_cfg"] = {"resize_mode": "longest"}
    d = tiny_dir.parent / "tiny_longest"
    d.mkdir(exist_ok=True)
    (d / "open_clip_config.json").write_text(json.dumps(longest))
    with pytest.raises(ValueError, match="resize_mode 'longest'.*use image_decode: pil or auto"):
        load_model(EmbedSpec(model=f"local-dir:{d}", pretrained="random", image_decode="torch"))


def test_weights_kind_of_each_model_and_pretrained_pair():
    """A checkpoint file or 'random' with an hf-hub: model is that file or a random init of the hub's
    architecture, never the hub's own weights loaded silently instead."""
    from mmbalance.operators.embed import classify_pretrained

    assert classify_pretrained("hf-hub:org/model", None) == "hub"
    assert classify_pretrained("hf-hub:org/model", "hf-hub:org/model") == "hub"
    assert classify_pretrained("hf-hub:org/model", "logs/run/checkpoints/epoch_3.pt") == "file"
    assert classify_pretrained("hf-hub:org/model", "random") == "random"
    assert classify_pretrained("ViT-B-32", "hf-hub:org/model") == "hub"
    assert classify_pretrained("ViT-B-32", "laion2b_s34b_b79k") == "tag"
    assert classify_pretrained("ViT-B-32", "s3://bucket/epoch_3.pt") == "file"
    assert classify_pretrained("local-dir:/m", "epoch_3.pt") == "file"
    assert classify_pretrained("local-dir:/m", None) == "local-dir"
