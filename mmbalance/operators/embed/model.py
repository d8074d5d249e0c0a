"""The open_clip model of the embed stage: ``load_model(spec) -> ModelBundle`` builds it (a tag, a hub
name, a checkpoint file or URI, a ``local-dir:`` config, or random init), never downloading unless
the spec names a tag or hub, and records what was loaded (``bundle.info``: name, tag, checkpoint
sha256, dim, versions) for run.json and sidecars. The bundle encodes image batches and captions;
``Preprocessor`` is open_clip's eval transform split into CPU geometry and a batched normalise.
torch and open_clip are imported lazily: the module imports without the ``embed`` extra.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.io.images import ImageError
from mmbalance.schemas.embed import RANDOM_INIT, EmbedSpec

log = logging.getLogger(__name__)


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


def import_open_clip():
    try:
        import open_clip
        import torch
    except ImportError as err:
        raise ImportError(
            f"embedding with a model needs torch and open_clip (pip install 'mmbalance[embed]'): {err}"
        ) from None
    return torch, open_clip


def resolve_device(spec: EmbedSpec) -> str:
    torch, _ = import_open_clip()
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

        torch, _ = import_open_clip()
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=getattr(torch, self.autocast_dtype))

    def _input_dtype(self):
        torch, _ = import_open_clip()
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.info["precision"], torch.float32)

    def side_stream(self):
        """The CUDA stream the prefetch thread decodes and resizes on, so that work overlaps the model."""
        torch, _ = import_open_clip()
        if "stream" not in self._pools:
            self._pools["stream"] = torch.cuda.Stream(device=self.device)
        return self._pools["stream"]

    def encode_images(self, pixels) -> np.ndarray:
        """uint8 (n, h, w, 3) numpy, uint8 (n, 3, h, w) tensor (any device), or normalised float32
        (n, 3, h, w) numpy -> unit float16 (n, dim)."""
        torch, _ = import_open_clip()
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
        torch, _ = import_open_clip()
        tokens = tokens.to(self.device, non_blocking=True)
        with self._autocast():
            feats = _encode_text_trimmed(self.model, tokens) if self.trim_text else self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1).to(torch.float16)

    def encode_tokens(self, tokens) -> np.ndarray:
        """Token ids (n, context) -> unit float16 (n, dim). With ``trim_text``, captions are grouped by
        length and each group runs only up to its longest caption (causal mask: same result)."""
        torch, _ = import_open_clip()
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
    torch, open_clip = import_open_clip()
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


def _model_source(spec: EmbedSpec, open_clip) -> tuple[str, str, dict | None, dict | None, bool]:
    """(kind of weights, name open_clip builds, the tag's config, the preprocessing a tag forces,
    quick_gelu) for a spec; nothing downloaded."""
    kind = classify_pretrained(spec.model, spec.pretrained)
    name = spec.pretrained if kind == "hub" and (spec.pretrained or "").startswith("hf-hub:") else spec.model
    tag_cfg, force_pp, quick_gelu = None, None, False
    if kind == "tag":
        tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(spec.model)
            raise ValueError(
                f"embed.pretrained '{spec.pretrained}' is not an open_clip tag of '{spec.model}', nor an existing "
                f"file (tags: {', '.join(tags) or 'none'})"
            )
        force_pp = {k: v for k, v in tag_cfg.items() if k in ("mean", "std", "interpolation", "resize_mode")}
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))  # open_clip only warns on a mismatch
    return kind, name, tag_cfg, force_pp, quick_gelu


def preprocess_config(spec: EmbedSpec | dict) -> dict:
    """The model's image preprocessing (size, mean, std, interpolation, resize mode) without its
    weights: the architecture is built on torch's meta device (no memory used, nothing downloaded
    but configs), so ``mmbalance validate`` checks images exactly as the embed stage prepares them."""
    torch, open_clip = import_open_clip()
    if isinstance(spec, dict):
        spec = EmbedSpec.model_validate(spec)
    _, name, _, force_pp, quick_gelu = _model_source(spec, open_clip)
    root = logging.getLogger()
    was_disabled = root.disabled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.disabled = True  # open_clip logs "no pretrained weights" through the root logger
        try:
            model = open_clip.create_model(name, pretrained=None, load_weights=False, force_preprocess_cfg=force_pp,
                                           force_quick_gelu=quick_gelu, device="meta")
        finally:
            root.disabled = was_disabled
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in open_clip.get_model_preprocess_cfg(model).items()}


def load_model(spec: EmbedSpec | dict, num_threads: int | None = None) -> ModelBundle:
    """Build the open_clip model named by the spec; never downloads unless the spec names a tag/hub."""
    torch, open_clip = import_open_clip()
    if isinstance(spec, dict):
        spec = EmbedSpec.model_validate(spec)
    if not spec.uses_model:
        raise ValueError("embed.npz is set: embeddings come from .npz files, not a model")
    threads = num_threads or spec.threads()
    torch.set_num_threads(threads)
    device = resolve_device(spec)
    weights_precision, autocast_dtype = _precision(spec, device)
    kind, name, tag_cfg, force_pp, quick_gelu = _model_source(spec, open_clip)
    info: dict[str, Any] = {"source": "open_clip", "model": spec.model, "pretrained": spec.pretrained,
                            "pretrained_kind": kind, "checkpoint_sha256": None}
    checkpoint = None
    if kind == "tag":
        checkpoint = open_clip.pretrained.download_pretrained(tag_cfg)
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
