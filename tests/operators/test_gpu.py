"""The GPU path: nvJPEG decode, tensor resize and fp16 embedding on CUDA, and faiss's GPU build.

Marked ``gpu`` and skipped without CUDA; ``bash benchmarks/gpu_check.sh`` runs them on a GPU machine.
Every check compares against the CPU path the rest of the suite proves against open_clip.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402

from corpora import TINY_OPEN_CLIP  # noqa: E402
from mmbalance.operators.embed.gpu_decode import _decode_jpegs_on_device  # noqa: E402
from mmbalance.operators.embed.model import load_model  # noqa: E402
from mmbalance.operators.embed.stage import EmbedColumns, embed_table  # noqa: E402
from mmbalance.schemas.embed import EmbedSpec  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COLS = EmbedColumns(uid="uid", image="image", caption="caption")


def photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth gradients plus mild noise: photo-like, so decoders differ only by rounding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(0.02 * (c + 1) * (x + y * 0.5) + c) for c in range(3)], -1)
    return (img + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "open_clip_config.json").write_text(json.dumps(TINY_OPEN_CLIP))
    return d


def spec(tiny_dir, **kw) -> EmbedSpec:
    return EmbedSpec(model=f"local-dir:{tiny_dir}", pretrained="random", batch_size=8, **kw)


def matrix(column) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size).astype(np.float32)


def test_batched_nvjpeg_decode_matches_libjpeg_on_the_cpu(tiny_dir):
    from torchvision.io import ImageReadMode, decode_jpeg

    bundle = load_model(spec(tiny_dir, num_gpus=1, device="cuda"))
    datas = [jpeg(photo(i, size)) for i, size in enumerate([(640, 480), (333, 500), (64, 64), (1000, 260)])]
    datas.append(jpeg(photo(9, (300, 200)), "L"))
    datas.append(jpeg(photo(10, (300, 200)), progressive=True))
    on_gpu = _decode_jpegs_on_device(bundle, datas)
    for data, got in zip(datas, on_gpu):
        assert got is not None and got.device.type == "cuda" and got.dtype == torch.uint8
        want = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert got.shape == want.shape
        diff = (got.cpu().int() - want.int()).abs().float()
        assert diff.mean() < 1.0 and torch.quantile(diff.flatten()[:1_000_000], 0.99) <= 3  # IDCT/upsampling rounding


def test_cuda_tensor_path_gives_the_cpu_rows_reasons_and_embeddings(tiny_dir):
    arr = photo(1, (120, 90))
    whole = jpeg(arr)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    images = [whole, jpeg(photo(2, (50, 130))), jpeg(arr, "L"), jpeg(arr, "CMYK"), png.getvalue(),
              whole[: len(whole) // 2], b"junk", None, b"", jpeg(np.zeros((4000, 1, 3), np.uint8))] * 3
    table = pa.table({"uid": [f"u{i}" for i in range(len(images))], "image": pa.array(images, pa.binary()),
                      "caption": ["a photo"] * len(images)})
    gpu = load_model(spec(tiny_dir, num_gpus=1))
    cpu = load_model(spec(tiny_dir, device="cpu", image_decode="pil"))
    assert gpu.device == "cuda" and gpu.image_decode == "torch" and gpu.autocast_dtype == "float16"
    got, got_rej = embed_table(table, gpu, COLS, shard="s")
    want, want_rej = embed_table(table, cpu, COLS, shard="s")
    assert got.column("row").equals(want.column("row")) and got_rej.equals(want_rej)
    assert got.num_rows == 15  # 5 usable images of 10, three times
    # fp16 autocast, nvJPEG and tensor resize against fp32, libjpeg and PIL: close, not equal
    assert np.abs(matrix(got.column("image_emb")) - matrix(want.column("image_emb"))).max() < 3e-2
    assert np.abs(matrix(got.column("text_emb")) - matrix(want.column("text_emb"))).max() < 3e-2


def test_vit_b32_fp16_on_cuda_agrees_with_fp32():
    fp16 = load_model(EmbedSpec(model="ViT-B-32", pretrained="random", num_gpus=1, precision="fp16"))
    fp32 = load_model(EmbedSpec(model="ViT-B-32", pretrained="random", num_gpus=1, precision="fp32"))
    assert fp16.info["weights_sha256"] == fp32.info["weights_sha256"]  # the same seeded init
    pixels = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, device="cuda")
    a, b = fp16.encode_images(pixels).astype(np.float32), fp32.encode_images(pixels).astype(np.float32)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=2e-3)
    assert (a * b).sum(axis=1).min() > 0.99  # cosine to the fp32 embedding


def test_faiss_sees_the_gpu():
    from mmbalance import faiss_build

    report = faiss_build.describe()
    if not report.get("gpu_build"):
        pytest.skip(f"faiss here has no GPU support ({', '.join(report['distributions']) or 'none'}): "
                    "python -m mmbalance.faiss_build --use gpu")
    faiss_build.check_installation(report["distributions"])
    assert report["num_gpus"] >= 1
