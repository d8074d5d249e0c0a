"""Decoding images for a model: bytes -> RGB PIL image with only its header read first (format, mode,
size checked), then open_clip's geometry (``model.Preprocessor``). Every failure is an
``ImageError`` with a stable problem key, never an exception past a row. No torch needed.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings

import numpy as np

from mmbalance.io.images import ImageError, ImageSource, short_error


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
        raise ImageError("too large", short_error(err)) from None
    except UnidentifiedImageError:
        raise ImageError("undecodable", f"unknown format, {len(data)} bytes starting {data[:8]!r}") from None
    except OSError as err:
        problem = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise ImageError(problem, short_error(err)) from None
    except Exception as err:  # decoders raise ValueError, SyntaxError, struct.error, ...
        raise ImageError("undecodable", f"{type(err).__name__}: {short_error(err)}") from None


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


def pil_pixels(bundle, data: bytes | None, column: str):
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
        return None, ImageError("undecodable", f"preprocess: {short_error(err)}").reason(column), t1 - t0, 0.0
    return arr, None, t1 - t0, time.perf_counter() - t1


def decode_one(bundle, source: ImageSource, item, column: str):
    """(pixels or None, reason or None, decode seconds, preprocess seconds) for one row."""
    t0 = time.perf_counter()
    try:
        data = source.read(*item)
    except ImageError as err:
        return None, err.reason(column), time.perf_counter() - t0, 0.0
    return pil_pixels(bundle, data, column)
