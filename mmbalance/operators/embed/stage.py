"""The embed stage's operator: ``embed_table`` (a plain function on an Arrow table) and ``embed_shard``
(streams one shard in batches; the stage runs it on an actor pool), and ``check_shard``, what the
stage would keep and reject without the model. Images reach the model one of two ways
(``embed.image_decode``): PIL on the decode threads (``images``), or on CUDA the batched nvJPEG
path (``gpu_decode``). Outputs are L2-normalised float16 fixed_size_list columns (see
``mmbalance.schemas.embed``); rejected rows come back with their reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.io.images import ImageSource
from mmbalance.io.source import read_source
from mmbalance.operators.embed.gpu_decode import prepare_tensors
from mmbalance.operators.embed.images import decode_one
from mmbalance.operators.embed.model import ModelBundle, Preprocessor
from mmbalance.operators.precomputed import Half, assemble, uid_strings
from mmbalance.schemas.embed import EmbedSpec


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


def _prepare(bundle: ModelBundle, columns: EmbedColumns, source: ImageSource, images, captions,
             start: int, stop: int) -> _Prepared:
    n = stop - start
    seconds = {"decode": 0.0, "preprocess": 0.0, "tokenize": 0.0}
    pixels = image_ok = image_reason = event = None
    if images is not None and bundle.image_decode == "torch":
        image_ok, image_reason, pixels, event = prepare_tensors(bundle, source, images[start:stop], columns.image, seconds)
    elif images is not None:
        results = list(bundle.pool("decode").map(lambda it: decode_one(bundle, source, it, columns.image),
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
        text_reason = caption_reasons(chunk, columns.caption)
        text_ok = np.array([r is None for r in text_reason], bool)
        tokens = bundle.tokenize([c for c, ok in zip(chunk, text_ok) if ok]) if text_ok.any() else []
        seconds["tokenize"] = time.perf_counter() - t0
    return _Prepared(start, stop, pixels, image_ok, image_reason, tokens, text_ok, text_reason, seconds, event)


def caption_reasons(captions: list[str | None], column: str) -> np.ndarray:
    """Why each caption cannot be embedded (None: it can)."""
    reason = np.full(len(captions), None, dtype=object)
    for i, c in enumerate(captions):
        if c is None:
            reason[i] = f"caption missing (column '{column}' is null)"
        elif not c.strip():
            reason[i] = f"caption empty (column '{column}')"
    return reason


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
    fmt: str = "auto",
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Stream one source shard (Parquet or WebDataset, ``fmt``) in batches: yields (sidecar rows, rejects) per batch.

    Relative image paths resolve against ``image_base`` (default: the shard's directory, same fs).
    ``only_rows`` (sorted shard row indices, e.g. the rows validation kept) limits the work to those.
    ``verify_checksums`` checks the shard's page CRCs (``execution.verify_checksums``); an unreadable
    page is an input error naming ``shard``.
    """
    source = ImageSource(fs, image_base if image_base is not None else path.rsplit("/", 1)[0] if "/" in path else "")
    for rows, table in selected_batches(fs, path, shard, columns.names(), batch_rows or 8 * bundle.spec.batch_size,
                                        only_rows, verify_checksums, fmt):
        yield embed_table(table, bundle, columns, shard, rows=rows, source=source, timings=timings)


def selected_batches(fs: pafs.FileSystem, path: str, shard: str, names: list[str], batch_rows: int,
                     only_rows: np.ndarray | None, verify_checksums: bool, fmt: str) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(shard row indices, table) per batch of a source shard, only the ``only_rows`` (sorted) if given."""
    done = 0
    for table in read_source(fs, path, shard, names, batch_rows, fmt, verify_checksums):
        rows = np.arange(done, done + table.num_rows, dtype=np.int64)
        done += table.num_rows
        if only_rows is not None:
            lo, hi = np.searchsorted(only_rows, [rows[0], rows[-1] + 1]) if len(rows) else (0, 0)
            rows = np.asarray(only_rows[lo:hi], np.int64)
            if not len(rows):
                continue
            table = table.take(pa.array(rows - (done - table.num_rows)))
        yield rows, table


@dataclass
class _Checker:
    """What ``images.decode_one`` reads of a bundle, without a model: the spec and the preprocessing."""

    spec: EmbedSpec
    preprocessor: Preprocessor


def check_shard(fs: pafs.FileSystem, path: str, shard: str, spec: EmbedSpec, preprocess: dict, columns: EmbedColumns,
                batch_rows: int, only_rows: np.ndarray | None = None, verify_checksums: bool = False,
                fmt: str = "auto") -> Iterator[tuple[pa.Table, pa.Table]]:
    """What ``embed_shard`` keeps and rejects, without running (or loading) the model: every image is
    read, decoded and put through the model's geometry as the PIL path does (the tensor path words its
    reasons the same), every caption checked, and the same policy decides (``precomputed.assemble``).
    Yields (kept rows: ``row``, ``uid``; rejects) per batch."""
    checker = _Checker(spec, Preprocessor(preprocess))
    source = ImageSource(fs, path.rsplit("/", 1)[0] if "/" in path else "")
    with ThreadPoolExecutor(max_workers=spec.decode_threads or spec.threads()) as pool:
        for rows, table in selected_batches(fs, path, shard, columns.names(), batch_rows, only_rows, verify_checksums, fmt):
            n = len(rows)
            image = text = None
            if columns.image:
                items = source.rows(table.column(columns.image))
                reasons = np.array([r[1] for r in pool.map(lambda it: decode_one(checker, source, it, columns.image), items)],
                                   dtype=object)
                image = Half(np.zeros((n, 1), np.float16), np.array([r is None for r in reasons], bool), reasons)
            if columns.caption:
                cap = table.column(columns.caption)
                reasons = caption_reasons((cap.cast(pa.string()) if not pa.types.is_string(cap.type) else cap).to_pylist(),
                                          columns.caption)
                text = Half(np.zeros((n, 1), np.float16), np.array([r is None for r in reasons], bool), reasons)
            kept, rejects = assemble(uid_strings(table.column(columns.uid)), rows, image, text, 1, shard,
                                     spec.on_image_error, spec.on_missing_caption)
            yield kept.select(["row", "uid"]), rejects
