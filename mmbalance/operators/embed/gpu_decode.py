"""The tensor path of the embed stage (``embed.image_decode: torch``): whole RGB/grey JPEGs decoded in
one batched nvJPEG call on CUDA and resized as tensors on a side stream by the prefetch thread while
the model runs the previous batch (torchvision's Resize and CenterCrop: open_clip's geometry); on
the CPU each decode thread decodes and resizes. Every other format goes through PIL
(``images.pil_pixels``) with the same reasons.
"""

from __future__ import annotations

import time

import numpy as np

from mmbalance.io.images import ImageError, ImageSource
from mmbalance.operators.embed.images import is_whole_jpeg, open_image, pil_pixels


def _jpeg_tensor(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _sniff_one(bundle, source: ImageSource, item, column: str, decode_here: bool):
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
    arr, reason, _, _ = pil_pixels(bundle, data, column)
    return ("pixels", arr, time.perf_counter() - t0) if arr is not None else (None, reason, time.perf_counter() - t0)


def _decode_jpegs_on_device(bundle, datas: list[bytes]) -> list:
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


def prepare_tensors(bundle, source: ImageSource, items: list, column: str, seconds: dict):
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
                arr, reason, _, _ = pil_pixels(bundle, r[1], column)
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
