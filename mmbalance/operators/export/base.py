"""What every export format shares: file names and keys, the run's domains, the rows a format gets
(``Rows``, per source shard), its context, the ``Exporter`` interface, atomic outputs kept open, and
the registry of formats (``register_format``: adding a format is one registered class in a module of
this package, see docs/architecture.md)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from mmbalance.io.images import ImageError, ImageSource
from mmbalance.io.storage import s3_endpoint
from mmbalance.io.store import RunStore
from mmbalance.schemas.recipe import Recipe
from mmbalance.schemas.export import ExportOptions


class ExportSkipped(RuntimeError):
    """A format that cannot be written here (e.g. its optional library is not installed)."""


_CLEAN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def sample_key(uid: str) -> str:
    """A dot-free, path-safe key: the uid itself when it is [A-Za-z0-9_-]{1,64}, else a readable
    prefix plus 12 hex digits of its SHA-1 (webdataset splits a file name at its first dot)."""
    if _CLEAN.match(uid):
        return uid
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", uid)[:48].strip("_") or "k"
    return f"{stem}-{hashlib.sha1(uid.encode()).hexdigest()[:12]}"


def copy_key(key: str, copy: int) -> str:
    # injective: the copy number is always the part after the last '_'
    return f"{key}_{copy}"


def safe_dir_names(names: list[str]) -> list[str]:
    """Directory-safe, unique names for domains (values are user data: '/', '::', spaces...)."""
    out, seen = [], set()
    for name in names:
        clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:48].strip("_")
        if clean != name or not clean or clean.lower() in seen:
            clean = f"{clean or 'domain'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
        seen.add(clean.lower())
        out.append(clean)
    return out


def domain_order(name: str) -> tuple:
    return (0, int(name), "") if re.fullmatch(r"-?\d+", name) else (1, 0, name)


IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
)


def sniff_image(data: bytes) -> str | None:
    """png / jpg / webp from the leading bytes (the extensions open_clip's webdataset reader takes)."""
    for magic, ext in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass
class Domain:
    name: str
    dir: str
    rows: int = 0  # manifest rows
    kept: int = 0  # rows with repeats > 0
    repeats: int = 0
    weight: float = 0.0
    min_weight: float = float("inf")  # over kept rows: uniform weights make per-domain mixing exact
    max_weight: float = 0.0
    target_share: float = 0.0  # sum of weights / total: the mixture the solution asks for
    effective_share: float = 0.0  # sum of repeats / total: what the stochastic rounding realised

    def to_dict(self) -> dict[str, Any]:
        uniform = self.kept == 0 or self.max_weight - self.min_weight <= 1e-9 * max(1.0, self.max_weight)
        return {
            "dir": self.dir, "rows": self.rows, "kept": self.kept, "repeats": self.repeats,
            "weight": round(self.weight, 9), "target_share": round(self.target_share, 12),
            "effective_share": round(self.effective_share, 12), "uniform_weights": bool(uniform),
        }


@dataclass
class Rows:
    """The kept manifest rows of one source shard, joined with their domain and source columns."""

    uid: list[str]
    key: list[str]
    domain: np.ndarray  # index into ExportContext.domains
    repeats: np.ndarray
    weight: np.ndarray
    shard: str
    row: np.ndarray
    caption: list[str | None] | None = None
    image: list[Any] | None = None  # bytes, or a path string (read on demand)
    images: ImageSource | None = None  # reads a path (relative to the shard's directory) when it is one
    _media: tuple[list[bytes | None], list[str | None], list[str | None]] | None = None

    def __len__(self) -> int:
        return len(self.uid)

    def media(self) -> tuple[list[bytes | None], list[str | None], list[str | None]]:
        """Image bytes, extension and a skip reason (None: usable) per row; computed once."""
        if self._media is None:
            data, ext, why = [], [], []
            for i in range(len(self)):
                value = self.image[i] if self.image is not None else None
                if isinstance(value, str):
                    try:
                        value = self.images.read(None, value)  # type: ignore[union-attr]
                    except ImageError:
                        value = None
                e = sniff_image(value) if value else None
                caption = self.caption[i] if self.caption is not None else None
                reason = None
                if caption is None:
                    reason = "no caption"
                elif not value:
                    reason = "no image"
                elif e is None:
                    reason = "image is not png, jpg or webp"
                data.append(value if reason is None else None)
                ext.append(e)
                why.append(reason)
            self._media = (data, ext, why)
        return self._media


@dataclass
class ExportContext:
    run: RunStore
    run_info: dict[str, Any]
    recipe: Recipe
    options: ExportOptions
    dest: str  # final export root (URI or absolute path): what written files refer to
    domain_column: str | None
    domains: list[Domain]
    epoch_size: int
    seed: int
    input_root: str
    input_fs: pafs.FileSystem
    caption_column: str | None
    image_column: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def dest_path(self, *parts: str) -> str:
        return "/".join([self.dest.rstrip("/"), *parts])


class Exporter:
    """One format's writer: ``write`` gets each shard's ``Rows``; ``close`` returns its summary."""

    dir: str = ""
    needs_source = True  # reads captions/images from the source shards

    def __init__(self, ctx: ExportContext, store: RunStore):
        self.ctx = ctx
        self.store = store  # rooted at this format's staging (or final) directory

    def write(self, rows: Rows) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def abort(self) -> None:
        """Called on failure: release open outputs (their temporaries are deleted)."""


FORMATS: dict[str, type[Exporter]] = {}


def register_format(*names: str) -> Callable[[type[Exporter]], type[Exporter]]:
    def deco(cls: type[Exporter]) -> type[Exporter]:
        for name in names:
            FORMATS[name] = cls
        return cls

    return deco


class OpenOutput:
    """An atomic output kept open across calls: ``commit`` publishes it, ``abort`` deletes it."""

    def __init__(self, store: RunStore, *parts: str):
        self._cm = store.atomic_output(*parts)
        self.stream = self._cm.__enter__()
        self.open = True

    def commit(self) -> None:
        if self.open:
            self.open = False
            self._cm.__exit__(None, None, None)

    def abort(self) -> None:
        if self.open:
            self.open = False
            err = RuntimeError("export aborted")
            try:
                self._cm.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass


def trainer_url(url: str) -> str:
    """A shard URL as webdataset (open_clip's loader) opens it: local paths and http(s) as they are,
    object-store URIs through the store's command-line tool (webdataset has no s3:// or gs:// handler)."""
    if url.startswith("s3://"):
        endpoint = s3_endpoint()
        return f"pipe:aws {f'--endpoint-url {endpoint} ' if endpoint else ''}s3 cp {url} -"
    if url.startswith("gs://"):
        return f"pipe:gcloud storage cat {url}"
    return url
