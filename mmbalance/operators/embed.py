"""Image and caption embeddings from an open_clip model.

Three layers, each usable alone:
  * ``decode_image`` / ``ImageSource``: bytes, HF ``{bytes, path}`` structs or paths (local, pyarrow
    filesystem URIs, fsspec URLs) -> RGB PIL images; every failure is a one-line reason, never an
    exception. No torch needed.
  * ``load_model(spec) -> ModelBundle``: the model, tokenizer, preprocessing and the record of what was
    loaded (``bundle.info``: name, tag, checkpoint sha256, dim, versions) for run.json and sidecars.
  * ``embed_table`` (plain function on an Arrow table) and ``embed_shard`` (streams one shard; the
    embed stage runs it on an actor pool).

Images reach the model one of two ways (``embed.image_decode``): PIL decodes, resizes and crops on the
decode threads (open_clip's own transform), or, on CUDA by default, whole RGB/grey JPEGs are decoded
in one batched nvJPEG call and resized as tensors on the GPU by the prefetch thread on a side stream
while the model runs the previous batch; every other format goes through PIL with the same reasons.

Outputs are L2-normalised float16 fixed_size_list columns (see ``mmbalance.schemas.embed``).
torch and open_clip are imported lazily: the module imports without the ``embed`` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.operators.precomputed import Half, assemble, uid_strings
from mmbalance.operators.source import read_batches
from mmbalance.schemas.embed import EMBED_NOTE, IMAGE_EMB, RANDOM_INIT, TEXT_EMB, EmbedSpec

log = logging.getLogger(__name__)

REJECT_REASON = "embed_reject_reason"


@dataclass(frozen=True)
class EmbedColumns:
    """Input columns the embed operator reads; ``image`` or ``caption`` may be absent."""

    uid: str = "uid"
    image: str | None = None
    caption: str | None = None

    @classmethod
    def from_recipe(cls, recipe) -> "EmbedColumns":
        cols = recipe.input.columns
        return cls(uid=cols.uid, image=cols.image, caption=cols.caption)

    def names(self) -> list[str]:
        return [c for c in (self.uid, self.image, self.caption) if c]


# -- images ------------------------------------------------------------------------------------


class ImageError(Exception):
    """Why one image cannot be used: ``problem`` is a stable short key, ``detail`` free text."""

    def __init__(self, problem: str, detail: str = ""):
        super().__init__(problem, detail)
        self.problem, self.detail = problem, detail

    def reason(self, column: str) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"image {self.problem} (column '{column}'{detail})"


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:160]


def to_rgb(img):
    """Any PIL mode -> RGB, as open_clip does (alpha dropped); 16-bit and float greyscale rescaled."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    return img.convert("RGB")


@contextlib.contextmanager
def _image_errors(data: bytes):
    """Decoder exceptions -> ``ImageError`` with a stable problem key."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF/palette noise
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError("too large", _short(err)) from None
    except UnidentifiedImageError:
        raise ImageError("undecodable", f"unknown format, {len(data)} bytes starting {data[:8]!r}") from None
    except OSError as err:
        problem = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise ImageError(problem, _short(err)) from None
    except Exception as err:  # decoders raise ValueError, SyntaxError, struct.error, ...
        raise ImageError("undecodable", f"{type(err).__name__}: {_short(err)}") from None


def open_image(data: bytes | None, max_pixels: int = 89_478_485):
    """Bytes -> a PIL image with only its header read (format, mode, size checked). Raises ``ImageError`` only."""
    from PIL import Image

    if data is None:
        raise ImageError("missing", "null")
    if len(data) == 0:
        raise ImageError("empty", "0 bytes")
    with _image_errors(data):
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError("zero size", f"{w}x{h}")
        if w * h > max_pixels:
            raise ImageError("too large", f"{w}x{h} is over {max_pixels} pixels")
        return img


def decode_image(data: bytes | None, max_pixels: int = 89_478_485, draft=None):
    """Bytes -> RGB PIL image (first frame of GIF/WebP animations). Raises ``ImageError`` only.

    ``draft(w, h) -> (w', h') | None``: for JPEGs, decode at the smallest DCT scale >= that size.
    """
    img = open_image(data, max_pixels)
    with _image_errors(data):
        if draft is not None and img.format == "JPEG":
            size = draft(*img.size)
            if size is not None:
                img.draft(img.mode, size)
        img.load()
        return to_rgb(img)


def is_whole_jpeg(img, data: bytes) -> bool:
    """A JPEG that libjpeg/nvJPEG decode to the same RGB as PIL: 1 or 3 components (not CMYK/YCCK)
    and an end-of-image marker (a truncated file goes to PIL, which rejects it as today)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


class ImageSource:
    """Reads image bytes for a row: inline bytes, or a path relative to ``base`` (the shard's directory)."""

    def __init__(self, fs: pafs.FileSystem | None = None, base: str | None = None):
        self.fs = fs or pafs.LocalFileSystem()
        self.base = base
        self._uri_fs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def rows(self, column: pa.Array | pa.ChunkedArray) -> list[tuple[bytes | None, str | None]]:
        """(bytes, path) per row; exactly one is used: bytes when not null, else path."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        t = arr.type
        if pa.types.is_null(t):
            return [(None, None)] * len(arr)
        if pa.types.is_struct(t):
            names = {t.field(i).name for i in range(t.num_fields)}
            valid = arr.is_valid().to_pylist()
            data = arr.field("bytes").to_pylist() if "bytes" in names else [None] * len(arr)
            paths = arr.field("path").to_pylist() if "path" in names else [None] * len(arr)
            return [(d, p) if ok else (None, None) for ok, d, p in zip(valid, data, paths)]
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return [(d, None) for d in arr.to_pylist()]
        if pa.types.is_dictionary(t):
            arr = arr.cast(t.value_type)
        return [(None, p) for p in arr.to_pylist()]

    def read(self, data: bytes | None, path: str | None) -> bytes | None:
        if data is not None:
            return data
        if path is None:
            return None
        if not path:
            raise ImageError("missing", "empty path")
        try:
            if "://" in path:
                return self._read_uri(path)
            full = path if (os.path.isabs(path) or self.base is None) else f"{self.base.rstrip('/')}/{path}"
            fs = self.fs if not os.path.isabs(path) else pafs.LocalFileSystem()
            with fs.open_input_stream(full) as stream:
                return stream.read()
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("not found", path[-200:]) from None
        except Exception as err:
            raise ImageError("unreadable", f"{path[-120:]}: {_short(err)}") from None

    def _read_uri(self, uri: str) -> bytes:
        scheme = uri.split("://", 1)[0]
        with self._lock:
            fs = self._uri_fs.get(scheme)
        if fs is None:
            try:
                fs, _ = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                fs = "fsspec"  # http(s), memory, ...: schemes pyarrow does not have
            with self._lock:
                self._uri_fs[scheme] = fs
        if fs == "fsspec":
            import fsspec

            with fsspec.open(uri, "rb") as handle:
                return handle.read()
        _, inner = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(inner) as stream:
            return stream.read()


# -- model ------------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 23), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def state_dict_sha256(model) -> str:
    """Hash of the weights themselves (names, shapes, dtypes, bytes): identifies random inits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update((t.float() if t.is_floating_point() else t).numpy().tobytes())
    return digest.hexdigest()


def _local_checkpoint(uri: str) -> str:
    """A local file for a checkpoint path or URI (URIs are copied once into a cache directory)."""
    if "://" not in uri:
        if not os.path.isfile(uri):
            raise FileNotFoundError(f"embed.pretrained: checkpoint file not found: {uri}")
        return uri
    cache = os.environ.get("MMBALANCE_CACHE", os.path.join(tempfile.gettempdir(), "mmbalance-checkpoints"))
    os.makedirs(cache, exist_ok=True)
    name = hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + uri.rsplit("/", 1)[-1]
    local = os.path.join(cache, name)
    if not os.path.exists(local):
        tmp = f"{local}.tmp-{os.getpid()}"
        try:
            fs, inner = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(inner) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 23):
                    dst.write(chunk)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            import fsspec

            with fsspec.open(uri, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 23):
                    dst.write(chunk)
        os.replace(tmp, local)
    return local


def classify_pretrained(model: str, pretrained: str | None) -> str:
    """'local-dir' | 'hub' | 'random' | 'file' | 'tag' for a (model, pretrained) pair."""
    if model.startswith("local-dir:"):
        return "file" if pretrained not in (None, RANDOM_INIT) else ("random" if pretrained == RANDOM_INIT else "local-dir")
    if pretrained == RANDOM_INIT:  # also for an hf-hub: model: its architecture, freshly initialised
        return "random"
    if (pretrained or "").startswith("hf-hub:") or (model.startswith("hf-hub:") and pretrained is None):
        return "hub"
    if model.startswith("hf-hub:"):  # the hub's architecture with weights from a file (a fine-tune)
        return "file"
    if pretrained and ("://" in pretrained or os.sep in pretrained or os.path.exists(pretrained)
                       or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))):
        return "file"
    return "tag"


def _import_open_clip():
    try:
        import open_clip
        import torch
    except ImportError as err:
        raise ImportError(
            f"embedding with a model needs torch and open_clip (pip install 'mmbalance[embed]'): {err}"
        ) from None
    return torch, open_clip


def resolve_device(spec: EmbedSpec) -> str:
    torch, _ = _import_open_clip()
    if spec.device == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if spec.device == "cuda":
        if not available:
            raise RuntimeError("embed.device is 'cuda' but CUDA is not available on this worker")
        return "cuda"
    if spec.num_gpus > 0 and not available:
        log.warning("embed.num_gpus=%s but CUDA is not available: embedding on CPU", spec.num_gpus)
    return "cuda" if spec.num_gpus > 0 and available else "cpu"


def _precision(spec: EmbedSpec, device: str) -> tuple[str, str | None]:
    """(open_clip precision for the weights, autocast dtype name or None)."""
    if device == "cpu" or spec.precision == "fp32":
        return "fp32", None
    if spec.precision in ("auto", "amp"):
        return "fp32", "float16"
    return spec.precision, "float16" if spec.precision == "fp16" else "bfloat16"


class Preprocessor:
    """open_clip's eval transform, split: geometry on the CPU (PIL -> uint8 HWC), then ToTensor +
    Normalize on the model's device in one batched op (same arithmetic, so identical values)."""

    def __init__(self, preprocess_cfg: dict):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = {k: v for k, v in preprocess_cfg.items()}
        self.cfg = cfg
        full = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        steps = list(full.transforms)
        names = [type(s).__name__ for s in steps[-2:]]
        self.geometry = steps[:-2] if names == ["MaybeToTensor", "Normalize"] else None
        self.full = full
        size = cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)
        self.mean = tuple(float(x) for x in cfg["mean"])
        self.std = tuple(float(x) for x in cfg["std"])
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.tensor_geometry = self._tensor_geometry()

    def draft_size(self, w: int, h: int) -> tuple[int, int] | None:
        """Smallest decode size that still covers the resize target (for JPEG draft mode)."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return (tw, th) if tw < w and th < h else None
        scale = min(tw / w, th / h) if self.resize_mode == "longest" else max(tw / w, th / h)
        if scale >= 1:
            return None
        return (math.ceil(w * scale), math.ceil(h * scale))

    MAX_RESIZE_FACTOR = 64  # resized image at most this many times the model input (aspect ~64:1)

    def check_size(self, w: int, h: int) -> None:
        """Refuse images whose resize would explode (a 1x50000 strip resized to 224 on its short side)."""
        th, tw = self.size
        if self.resize_mode != "shortest":
            return
        scale = max(tw / w, th / h)
        if (w * scale) * (h * scale) > self.MAX_RESIZE_FACTOR * tw * th:
            raise ImageError("too elongated", f"{w}x{h}")

    TENSOR_STEPS = ("Resize", "CenterCrop", "MaybeConvertMode")  # torchvision steps that take tensors too

    def _tensor_geometry(self) -> list | None:
        """The geometry steps applied to uint8 (3, h, w) tensors, or None when a step is PIL-only
        (open_clip's ResizeKeepRatio for resize_mode 'longest', custom transforms). Mode conversion is
        dropped: decoded tensors are RGB already."""
        if self.geometry is None or any(type(s).__name__ not in self.TENSOR_STEPS for s in self.geometry):
            return None
        return [s for s in self.geometry if type(s).__name__ != "MaybeConvertMode"]

    def resize_tensor(self, x):
        """uint8 (3, h, w) RGB tensor on any device -> uint8 (3, H, W): torchvision's Resize (bicubic,
        antialias) and CenterCrop on tensors, the same geometry open_clip applies to PIL images."""
        for step in self.tensor_geometry:
            x = step(x)
        return x

    def pixels(self, img) -> np.ndarray:
        """RGB PIL image -> uint8 (h, w, 3), or float32 (3, h, w) normalised when the transform is custom."""
        if self.geometry is None:
            return self.full(img).numpy()
        for step in self.geometry:
            img = step(img)
        return np.asarray(img, dtype=np.uint8)


@dataclass
class ModelBundle:
    """A loaded model and everything needed to embed with it; ``info`` is the JSON-able record."""

    spec: EmbedSpec
    model: Any
    tokenizer: Any
    preprocessor: Preprocessor
    device: str
    autocast_dtype: str | None
    info: dict
    trim_text: bool = False  # run the text tower only up to each group's longest caption
    image_decode: str = "pil"  # resolved embed.image_decode: 'pil' or 'torch'
    _pools: dict = field(default_factory=dict, repr=False)

    @property
    def dim(self) -> int:
        return int(self.info["embedding_dim"])

    def pool(self, name: str) -> ThreadPoolExecutor:
        if name not in self._pools:
            workers = (self.spec.decode_threads or self.spec.threads()) if name == "decode" else 1
            self._pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"embed-{name}")
        return self._pools[name]

    def _autocast(self):
        import contextlib

        torch, _ = _import_open_clip()
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=getattr(torch, self.autocast_dtype))

    def _input_dtype(self):
        torch, _ = _import_open_clip()
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.info["precision"], torch.float32)

    def side_stream(self):
        """The CUDA stream the prefetch thread decodes and resizes on, so that work overlaps the model."""
        torch, _ = _import_open_clip()
        if "stream" not in self._pools:
            self._pools["stream"] = torch.cuda.Stream(device=self.device)
        return self._pools["stream"]

    def encode_images(self, pixels) -> np.ndarray:
        """uint8 (n, h, w, 3) numpy, uint8 (n, 3, h, w) tensor (any device), or normalised float32
        (n, 3, h, w) numpy -> unit float16 (n, dim)."""
        torch, _ = _import_open_clip()
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float16)
        with torch.inference_mode():
            channels_first = isinstance(pixels, torch.Tensor)
            x = pixels if channels_first else torch.from_numpy(pixels)
            if x.device.type == "cpu" and self.device != "cpu":
                x = x.pin_memory().to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                # exactly torchvision's ToTensor + Normalize, batched
                x = (x if channels_first else x.permute(0, 3, 1, 2)).contiguous().to(torch.float32).div(255)
                mean = torch.tensor(self.preprocessor.mean, device=x.device).view(1, -1, 1, 1)
                std = torch.tensor(self.preprocessor.std, device=x.device).view(1, -1, 1, 1)
                x = x.sub_(mean).div_(std)
            x = x.to(self._input_dtype())
            with self._autocast():
                feats = self.model.encode_image(x)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            return feats.to(torch.float16).cpu().numpy()

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts)  # truncates to the context length as open_clip does

    def _text_features(self, tokens):
        torch, _ = _import_open_clip()
        tokens = tokens.to(self.device, non_blocking=True)
        with self._autocast():
            feats = _encode_text_trimmed(self.model, tokens) if self.trim_text else self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1).to(torch.float16)

    def encode_tokens(self, tokens) -> np.ndarray:
        """Token ids (n, context) -> unit float16 (n, dim). With ``trim_text``, captions are grouped by
        length and each group runs only up to its longest caption (causal mask: same result)."""
        torch, _ = _import_open_clip()
        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.dim), np.float16)
        with torch.inference_mode():
            if not self.trim_text:
                return self._text_features(tokens).cpu().numpy()
            lengths = (tokens != 0).sum(dim=1)
            order = torch.argsort(lengths, stable=True)
            group = max(32, self.spec.batch_size // 4)
            out = torch.empty((n, self.dim), dtype=torch.float16)
            for g in range(0, n, group):
                idx = order[g : g + group]
                width = int(lengths[idx].max())
                out[idx] = self._text_features(tokens[idx, :width]).cpu()
            return out.numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode_tokens(self.tokenize(texts))

    def close(self) -> None:
        for pool in self._pools.values():
            if isinstance(pool, ThreadPoolExecutor):
                pool.shutdown(wait=False)
        self._pools.clear()


def _encode_text_trimmed(model, tokens):
    """open_clip's ``CLIP.encode_text`` for token rows cut after the longest caption: positional
    embedding and causal mask sliced to the length (pads after EOT never reach the pooled EOT)."""
    import torch
    from open_clip.transformer import text_global_pool

    width = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:width].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:width, :width])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def _can_trim_text(model, tokenizer) -> bool:
    """Only for open_clip's plain CLIP text tower (causal mask, EOT-argmax pooling), and only if a
    self-check on this model agrees with the untrimmed forward."""
    torch, open_clip = _import_open_clip()
    if type(model) is not open_clip.CLIP or getattr(model, "text_pool_type", None) != "argmax":
        return False
    if getattr(model, "attn_mask", None) is None or not isinstance(tokenizer, open_clip.SimpleTokenizer):
        return False
    tokens = tokenizer(["a photo", "a longer caption of a dog on a red sofa next to a window"])
    width = int((tokens != 0).sum(dim=1).max())
    with torch.inference_mode():
        full = model.encode_text(tokens).float()
        cut = _encode_text_trimmed(model, tokens[:, :width]).float()
    return bool(torch.allclose(full, cut, rtol=1e-4, atol=1e-5 * float(full.abs().max())))


def load_model(spec: EmbedSpec | dict, num_threads: int | None = None) -> ModelBundle:
    """Build the open_clip model named by the spec; never downloads unless the spec names a tag/hub."""
    torch, open_clip = _import_open_clip()
    if isinstance(spec, dict):
        spec = EmbedSpec.model_validate(spec)
    if not spec.uses_model:
        raise ValueError("embed.npz is set: embeddings come from .npz files, not a model")
    threads = num_threads or spec.threads()
    torch.set_num_threads(threads)
    device = resolve_device(spec)
    weights_precision, autocast_dtype = _precision(spec, device)
    kind = classify_pretrained(spec.model, spec.pretrained)
    name = spec.pretrained if kind == "hub" and (spec.pretrained or "").startswith("hf-hub:") else spec.model
    info: dict[str, Any] = {"source": "open_clip", "model": spec.model, "pretrained": spec.pretrained,
                            "pretrained_kind": kind, "checkpoint_sha256": None}
    checkpoint = None
    force_pp = None
    quick_gelu = False
    if kind == "tag":
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(spec.model)
            raise ValueError(
                f"embed.pretrained '{spec.pretrained}' is not an open_clip tag of '{spec.model}', nor an existing "
                f"file (tags: {', '.join(tags) or 'none'})"
            )
        checkpoint = open_clip.pretrained.download_pretrained(tag_cfg)
        force_pp = {k: v for k, v in tag_cfg.items() if k in ("mean", "std", "interpolation", "resize_mode")}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # open_clip only warns on a mismatch
        info["quick_gelu"] = quick_gelu
    elif kind == "file":
        checkpoint = _local_checkpoint(spec.pretrained)
        info["checkpoint_uri"] = spec.pretrained

    quiet = kind in ("random", "file", "tag")  # we load these weights ourselves: no "random init" warning
    root = logging.getLogger()
    was_disabled = root.disabled
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(spec.seed)
        if quiet:
            warnings.simplefilter("ignore")
            root.disabled = True  # open_clip logs through the root logger
        try:
            model = open_clip.create_model(
                name,
                pretrained=None,  # tags and files are loaded below; schema names load their own
                load_weights=kind not in ("random", "file"),
                force_preprocess_cfg=force_pp,
                force_quick_gelu=quick_gelu,
                require_pretrained=kind == "hub",  # never fall back to random weights silently
            )
        finally:
            root.disabled = was_disabled
    if checkpoint:
        open_clip.load_checkpoint(model, checkpoint, strict=True)
    if kind == "local-dir":
        from open_clip.factory import _find_checkpoint_in_dir
        from pathlib import Path

        checkpoint = _find_checkpoint_in_dir(Path(spec.model[len("local-dir:"):]))
        if checkpoint is None:  # a config without weights: open_clip inits randomly
            log.warning("embed.model %s holds no weights: random init (seed %d)", spec.model, spec.seed)
            kind = info["pretrained_kind"] = "random"
    if kind == "hub" and checkpoint is None:
        try:
            from open_clip.pretrained import download_pretrained_from_hf

            checkpoint = download_pretrained_from_hf(name.removeprefix("hf-hub:"))  # cached by create_model
        except Exception:  # the hash is best effort for hub models
            checkpoint = None
    if checkpoint:
        info["checkpoint_sha256"] = file_sha256(checkpoint)
    if kind == "random":
        info["seed"] = spec.seed
        info["weights_sha256"] = state_dict_sha256(model)

    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    trim_text = _can_trim_text(model, tokenizer)  # checked on the CPU in fp32, before any cast
    if weights_precision != "fp32":
        from open_clip.factory import _set_model_device_and_precision

        is_timm = hasattr(getattr(model, "visual", None), "trunk")  # open_clip's TimmModel
        _set_model_device_and_precision(model, torch.device(device), weights_precision, is_timm)
    else:
        model.to(device)
    pp_cfg = open_clip.get_model_preprocess_cfg(model)
    preprocessor = Preprocessor(pp_cfg)
    image_decode = _resolve_image_decode(spec, device, preprocessor)
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:  # timm / custom towers: ask the model
        with torch.inference_mode():
            h, w = preprocessor.size
            dim = model.encode_image(torch.zeros(1, 3, h, w, device=device)).shape[-1]
    info.update({
        "embedding_dim": int(dim),
        "image_size": list(preprocessor.size),
        "context_length": int(getattr(tokenizer, "context_length", 0) or 0),
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp_cfg.items()},
        "jpeg_draft": spec.jpeg_draft,
        "trim_text": trim_text,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "precision": weights_precision if autocast_dtype is None or weights_precision != "fp32" else "amp",
        "device": device,
        "image_decode": image_decode,
    })
    return ModelBundle(spec, model, tokenizer, preprocessor, device, autocast_dtype, info, trim_text, image_decode)


def _resolve_image_decode(spec: EmbedSpec, device: str, preprocessor: Preprocessor) -> str:
    """embed.image_decode -> 'pil' | 'torch' for this device and model (auto: torch on CUDA)."""
    if spec.image_decode == "pil" or (spec.image_decode == "auto" and (device == "cpu" or spec.jpeg_draft)):
        return "pil"
    if preprocessor.tensor_geometry is None:
        if spec.image_decode == "torch":
            raise ValueError(
                f"embed.image_decode 'torch' resizes with torchvision's Resize and CenterCrop, but this model's "
                f"preprocessing (resize_mode '{preprocessor.resize_mode}') needs PIL: use image_decode: pil or auto"
            )
        return "pil"
    return "torch"


def model_info(spec: EmbedSpec | dict) -> dict:
    """The record for run.json without keeping the model (loads it once on the CPU)."""
    if isinstance(spec, dict):
        spec = EmbedSpec.model_validate(spec)
    bundle = load_model(spec.model_copy(update={"device": "cpu", "num_gpus": 0.0}))
    bundle.close()
    info = dict(bundle.info)
    for key in ("precision", "device", "image_decode"):
        info.pop(key, None)
    return info


# -- the operator -----------------------------------------------------------------------------


@dataclass
class _Prepared:
    start: int
    stop: int
    pixels: np.ndarray | None
    image_ok: np.ndarray | None
    image_reason: np.ndarray | None
    tokens: Any
    text_ok: np.ndarray | None
    text_reason: np.ndarray | None
    seconds: dict
    ready: Any = None  # CUDA event: the side stream finished decoding and resizing ``pixels``


def _pil_pixels(bundle: ModelBundle, data: bytes | None, column: str):
    """(pixels or None, reason or None, decode seconds, preprocess seconds): PIL decode + open_clip geometry."""
    t0 = time.perf_counter()
    draft = bundle.preprocessor.draft_size if bundle.spec.jpeg_draft else None
    try:
        img = decode_image(data, bundle.spec.max_image_pixels, draft)
    except ImageError as err:
        return None, err.reason(column), time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    try:
        bundle.preprocessor.check_size(*img.size)
        arr = bundle.preprocessor.pixels(img)
    except ImageError as err:
        return None, err.reason(column), t1 - t0, 0.0
    except Exception as err:
        return None, ImageError("undecodable", f"preprocess: {_short(err)}").reason(column), t1 - t0, 0.0
    return arr, None, t1 - t0, time.perf_counter() - t1


def _decode_one(bundle: ModelBundle, source: ImageSource, item, column: str):
    """(pixels or None, reason or None, decode seconds, preprocess seconds) for one row."""
    t0 = time.perf_counter()
    try:
        data = source.read(*item)
    except ImageError as err:
        return None, err.reason(column), time.perf_counter() - t0, 0.0
    return _pil_pixels(bundle, data, column)


def _jpeg_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _sniff_one(bundle: ModelBundle, source: ImageSource, item, column: str, decode_here: bool):
    """Tensor path, one row on a decode thread -> (kind, payload, seconds). kind 'jpeg': bytes left
    for the batched device decode; 'tensor': uint8 (3, H, W) decoded and resized here (CPU device);
    'pixels': uint8 (H, W, 3) from PIL (formats the tensor path does not take); None: payload is the
    reject reason, worded as on the PIL path."""
    t0 = time.perf_counter()
    try:
        data = source.read(*item)
        img = open_image(data, bundle.spec.max_image_pixels)
    except ImageError as err:
        return None, err.reason(column), time.perf_counter() - t0
    if is_whole_jpeg(img, data):
        try:
            bundle.preprocessor.check_size(*img.size)
        except ImageError as err:
            return None, err.reason(column), time.perf_counter() - t0
        if not decode_here:
            return "jpeg", data, time.perf_counter() - t0
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            x = decode_jpeg(_jpeg_tensor(data), mode=ImageReadMode.RGB)
            return "tensor", bundle.preprocessor.resize_tensor(x), time.perf_counter() - t0
        except Exception:  # PIL below decodes it or words the reason
            pass
    arr, reason, _, _ = _pil_pixels(bundle, data, column)
    return ("pixels", arr, time.perf_counter() - t0) if arr is not None else (None, reason, time.perf_counter() - t0)


def _decode_jpegs_on_device(bundle: ModelBundle, datas: list[bytes]) -> list:
    """Batched nvJPEG decode; a batch that fails is retried image by image (None for an image that fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [_jpeg_tensor(d) for d in datas]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=bundle.device))
    except Exception:
        out = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=bundle.device))
            except Exception:
                out.append(None)
        return out


def _prepare_tensors(bundle: ModelBundle, source: ImageSource, items: list, column: str, seconds: dict):
    """Tensor path for one model batch -> (ok, reasons, uint8 (m, 3, H, W) tensor or None, CUDA event or None).

    On CUDA the decode threads only read bytes and headers; this (prefetch) thread decodes the JPEGs in
    one nvJPEG call and resizes them on a side stream, so the model's stream never waits for it, and
    uploads the PIL-decoded rows from pinned memory. On the CPU each decode thread decodes and resizes.
    """
    import torch

    on_device = bundle.device != "cpu"
    results = list(bundle.pool("decode").map(lambda it: _sniff_one(bundle, source, it, column, not on_device), items))
    seconds["decode"] += sum(r[2] for r in results)
    reasons = np.array([r[1] if r[0] is None else None for r in results], dtype=object)
    if not on_device:
        good = [r[1] if r[0] == "tensor" else torch.from_numpy(np.array(r[1])).permute(2, 0, 1) for r in results if r[0]]
        ok = np.array([r[0] is not None for r in results], bool)
        return ok, reasons, (torch.stack(good) if good else None), None
    t0 = time.perf_counter()
    stream = bundle.side_stream()
    with torch.cuda.stream(stream):
        jpeg_rows = [i for i, r in enumerate(results) if r[0] == "jpeg"]
        decoded = dict(zip(jpeg_rows, _decode_jpegs_on_device(bundle, [results[i][1] for i in jpeg_rows])))
        parts, host = [], {}
        for i, r in enumerate(results):
            if r[0] == "jpeg" and decoded[i] is None:  # nvJPEG refused it: PIL decodes it or words the reason
                arr, reason, _, _ = _pil_pixels(bundle, r[1], column)
                r = results[i] = ("pixels", arr, 0.0) if arr is not None else (None, reason, 0.0)
                reasons[i] = reason
            if r[0] == "jpeg":
                parts.append(bundle.preprocessor.resize_tensor(decoded[i]))
            elif r[0] == "pixels":
                host[len(parts)] = r[1]
                parts.append(None)
        if host:
            staged = torch.from_numpy(np.stack(list(host.values()))).pin_memory()
            uploaded = staged.to(bundle.device, non_blocking=True).permute(0, 3, 1, 2)
            for j, pos in enumerate(host):
                parts[pos] = uploaded[j]
        pixels = torch.stack(parts) if parts else None
        event = torch.cuda.Event()
        event.record(stream)
    seconds["device_decode"] = seconds.get("device_decode", 0.0) + time.perf_counter() - t0
    ok = np.array([r[0] is not None for r in results], bool)
    return ok, reasons, pixels, event


def _prepare(bundle: ModelBundle, columns: EmbedColumns, source: ImageSource, images, captions,
             start: int, stop: int) -> _Prepared:
    n = stop - start
    seconds = {"decode": 0.0, "preprocess": 0.0, "tokenize": 0.0}
    pixels = image_ok = image_reason = event = None
    if images is not None and bundle.image_decode == "torch":
        image_ok, image_reason, pixels, event = _prepare_tensors(bundle, source, images[start:stop], columns.image, seconds)
    elif images is not None:
        results = list(bundle.pool("decode").map(lambda it: _decode_one(bundle, source, it, columns.image),
                                                 images[start:stop]))
        image_ok = np.array([r[0] is not None for r in results], bool)
        image_reason = np.array([r[1] for r in results], dtype=object)
        good = [r[0] for r in results if r[0] is not None]
        pixels = np.stack(good) if good else None
        seconds["decode"] = sum(r[2] for r in results)
        seconds["preprocess"] = sum(r[3] for r in results)
    tokens = text_ok = text_reason = None
    if captions is not None:
        t0 = time.perf_counter()
        chunk = captions[start:stop]
        text_reason = np.full(n, None, dtype=object)
        for i, c in enumerate(chunk):
            if c is None:
                text_reason[i] = f"caption missing (column '{columns.caption}' is null)"
            elif not c.strip():
                text_reason[i] = f"caption empty (column '{columns.caption}')"
        text_ok = np.array([r is None for r in text_reason], bool)
        tokens = bundle.tokenize([c for c, ok in zip(chunk, text_ok) if ok]) if text_ok.any() else []
        seconds["tokenize"] = time.perf_counter() - t0
    return _Prepared(start, stop, pixels, image_ok, image_reason, tokens, text_ok, text_reason, seconds, event)


def _add(timings: dict | None, key: str, value: float) -> None:
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + value


def embed_table(
    table: pa.Table,
    bundle: ModelBundle,
    columns: EmbedColumns,
    shard: str = "",
    row_offset: int = 0,
    rows: np.ndarray | None = None,
    source: ImageSource | None = None,
    timings: dict | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Embed one batch of rows -> (sidecar rows, REJECTS_SCHEMA rows), see ``precomputed.assemble``.

    ``rows`` (default ``row_offset + arange``) are the shard row indices written to ``row``.
    ``timings`` accumulates thread-seconds per stage (decode, preprocess, tokenize, image_model,
    text_model) and counts (images, captions).
    """
    n = table.num_rows
    dim = bundle.dim
    source = source or ImageSource()
    if rows is None:
        rows = np.arange(row_offset, row_offset + n, dtype=np.int64)
    images = source.rows(table.column(columns.image)) if columns.image else None
    captions = None
    if columns.caption:
        cap = table.column(columns.caption)
        captions = (cap.cast(pa.string()) if not pa.types.is_string(cap.type) else cap).to_pylist()

    img_vals = np.zeros((n, dim), np.float16) if images is not None else None
    txt_vals = np.zeros((n, dim), np.float16) if captions is not None else None
    img_ok, img_reason = np.zeros(n, bool), np.full(n, None, dtype=object)
    txt_ok, txt_reason = np.zeros(n, bool), np.full(n, None, dtype=object)
    bs = bundle.spec.batch_size
    bounds = [(s, min(s + bs, n)) for s in range(0, n, bs)]
    prep = bundle.pool("prepare")

    def submit(k):
        return prep.submit(_prepare, bundle, columns, source, images, captions, *bounds[k])

    pending = submit(0) if bounds else None
    for k in range(len(bounds)):
        p = pending.result()
        pending = submit(k + 1) if k + 1 < len(bounds) else None  # decode the next chunk meanwhile
        for key, value in p.seconds.items():
            _add(timings, key, value)
        sl = slice(p.start, p.stop)
        if images is not None:
            idx = np.flatnonzero(p.image_ok) + p.start
            if len(idx):
                t0 = time.perf_counter()
                if p.ready is not None:  # made on the prefetch thread's stream: order the model after it
                    import torch

                    current = torch.cuda.current_stream()
                    current.wait_event(p.ready)
                    p.pixels.record_stream(current)
                img_vals[idx] = bundle.encode_images(p.pixels)
                _add(timings, "image_model", time.perf_counter() - t0)
            img_ok[sl], img_reason[sl] = p.image_ok, p.image_reason
            _add(timings, "images", p.stop - p.start)
        if captions is not None:
            idx = np.flatnonzero(p.text_ok) + p.start
            if len(idx):
                t0 = time.perf_counter()
                txt_vals[idx] = bundle.encode_tokens(p.tokens)
                _add(timings, "text_model", time.perf_counter() - t0)
            txt_ok[sl], txt_reason[sl] = p.text_ok, p.text_reason
            _add(timings, "captions", p.stop - p.start)
    image = Half(img_vals, img_ok, img_reason) if images is not None else None
    text = Half(txt_vals, txt_ok, txt_reason) if captions is not None else None
    return assemble(uid_strings(table.column(columns.uid)), np.asarray(rows, np.int64), image, text, dim, shard,
                    bundle.spec.on_image_error, bundle.spec.on_missing_caption, bundle.info)


def embed_shard(
    fs: pafs.FileSystem,
    path: str,
    shard: str,
    bundle: ModelBundle,
    columns: EmbedColumns,
    batch_rows: int | None = None,
    image_base: str | None = None,
    timings: dict | None = None,
    only_rows: np.ndarray | None = None,
    verify_checksums: bool = False,
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Stream one Parquet shard in batches: yields (sidecar rows, rejects) per batch.

    Relative image paths resolve against ``image_base`` (default: the shard's directory, same fs).
    ``only_rows`` (sorted shard row indices, e.g. the rows validation kept) limits the work to those.
    ``verify_checksums`` checks the shard's page CRCs (``execution.verify_checksums``); an unreadable
    page is an input error naming ``shard``.
    """
    base = image_base if image_base is not None else path.rsplit("/", 1)[0] if "/" in path else ""
    source = ImageSource(fs, base)
    done = 0
    with fs.open_input_file(path) as handle:
        for table in read_batches(handle, shard, columns.names(), batch_rows or 8 * bundle.spec.batch_size,
                                  verify_checksums):
            rows = np.arange(done, done + table.num_rows, dtype=np.int64)
            done += table.num_rows
            if only_rows is not None:
                lo, hi = np.searchsorted(only_rows, [rows[0], rows[-1] + 1]) if len(rows) else (0, 0)
                rows = np.asarray(only_rows[lo:hi], np.int64)
                if not len(rows):
                    continue
                table = table.take(pa.array(rows - (done - table.num_rows)))
            yield embed_table(table, bundle, columns, shard, rows=rows, source=source, timings=timings)
