"""Trainer-ready files from a finished run: ``export_run(out_dir, formats, options)``.

Two streaming passes over the run, one source shard at a time (bounded memory, never the corpus):

1. manifest + domain column -> per-domain counts and shares -> ``DEST/mixture.json``;
2. manifest rows with repeats > 0, joined on ``row`` with the domain column and with the source
   columns they need (caption, image) -> every requested format's writer.

Each format writes into a hidden staging directory that replaces ``DEST/<format dir>`` only when
it is complete (a rename on local disks; on object stores each file is written atomically and the
directory is cleared first). Nothing depends on time or randomness, so re-exporting gives the same
bytes. Formats register with ``register_format``; a format whose optional library is missing raises
``ExportSkipped`` and the others still finish. With ``copies: repeats`` (the default) every format
draws each kept row in proportion to its ``repeats``; ``mixture.json`` says how, holds the open_clip
command lines and the expected per-epoch share deviation of the webdataset tars.
"""

from __future__ import annotations

import importlib
import pkgutil
import shlex
import shutil
import tempfile
import uuid
from typing import Any

import pyarrow.fs as pafs

from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.io.storage import configure_storage, ensure_bucket
from mmbalance.operators.export.base import FORMATS, ExportContext, Exporter, ExportSkipped
from mmbalance.operators.export.reading import default_image_column, input_location, iter_rows, load_run, mixture
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.export import EXPORT_FORMATS, ExportOptions


def format_dirs(formats: list[str]) -> list[tuple[str, type[Exporter]]]:
    out: list[tuple[str, type[Exporter]]] = []
    for name in formats:
        if name not in EXPORT_FORMATS:
            raise InputError(f"unknown export format {name!r} (known: {', '.join(EXPORT_FORMATS)})")
        if name == "parquet":
            continue  # the canonical manifest is already in OUT/manifest/
        cls = FORMATS[name]
        if all(c is not cls for _, c in out):
            out.append((name, cls))
    return out


def _dest_uri(out_dir: str, dest: str) -> str:
    if "://" in dest or dest.startswith("/"):
        return dest
    run_fs, run_root = resolve_filesystem(out_dir)
    if "://" in out_dir:
        return out_dir.rstrip("/") + "/" + dest
    return f"{run_root.rstrip('/')}/{dest}"


def mixture_dict(ctx: ExportContext) -> dict[str, Any]:
    return {
        "seed": ctx.seed,
        "epoch_size": ctx.epoch_size,
        "domain": {"column": ctx.domain_column, "source": ctx.options.domain.source if ctx.domain_column else None},
        "totals": {
            "rows": sum(d.rows for d in ctx.domains),
            "kept": sum(d.kept for d in ctx.domains),
            "repeats": sum(d.repeats for d in ctx.domains),
            "weight": round(sum(d.weight for d in ctx.domains), 9),
        },
        "domains": {d.name: d.to_dict() for d in ctx.domains},
        "shares": "target_share = sum of weights / total (the solution); effective_share = sum of repeats / "
                  "total (after seeded stochastic rounding)",
        "copies": ctx.options.copies,
        "realises": ("each kept row drawn in proportion to its repeats (domain shares = effective_share): copies "
                     "in csv, webdataset/wids, bigvision; repeat counts in streaming, hf and datacomp"
                     if ctx.options.copies == "repeats" else
                     "domain shares = target_share; rows within a domain drawn equally often (csv still "
                     "carries repeats)"),
    }


def export_run(out_dir: str, formats: list[str], options: ExportOptions | None = None) -> dict[str, Any]:
    """Write ``formats`` for the run in ``out_dir``; returns {"mixture": ..., format: summary}."""
    opts = options or ExportOptions()
    run, info, shards, recipe = load_run(out_dir)
    if not recipe.storage.is_default():
        configure_storage(recipe.storage)  # the run's settings reach its input (and an object-store dest)
    plan = format_dirs(list(formats))
    column = opts.domain.column_name()
    hex_uids = "datacomp" in formats and opts.datacomp.non_hex_uids == "error"
    domains = mixture(run, shards, opts, column, hex_uids)
    total_repeats = sum(d.repeats for d in domains)
    need_source = any(cls.needs_source for _, cls in plan)
    if need_source:
        input_fs, input_root = input_location(info, opts.input, out_dir)
    else:
        input_fs, input_root = pafs.LocalFileSystem(), ""
    caption = opts.caption_column or recipe.input.columns.caption
    image = opts.image_column or (default_image_column(recipe, input_fs, input_root, shards) if need_source else None)
    ctx = ExportContext(
        run=run, run_info=info, recipe=recipe, options=opts, dest=_dest_uri(out_dir, opts.dest),
        domain_column=column, domains=domains, epoch_size=opts.epoch_size or total_repeats,
        seed=int((info.get("seeds") or {}).get("export", recipe.export.seed)),
        input_root=input_root, input_fs=input_fs, caption_column=caption, image_column=image,
    )
    if total_repeats == 0 and plan:
        raise InputError(f"{out_dir}: the manifest keeps no rows (every repeats is 0); nothing to export")
    ensure_bucket(ctx.dest)
    dest = RunStore(ctx.dest)
    dest.makedirs()
    results: dict[str, Any] = {"mixture": mixture_dict(ctx)}

    local = isinstance(dest.fs, pafs.LocalFileSystem)
    writers: list[tuple[str, Exporter, str]] = []  # (format, writer, staging path)
    stagings: list[str] = []
    uploaders: dict[str, Any] = {}  # object stores: format -> the uploader of its files
    try:
        for name, cls in plan:
            if local:
                for leftover in dest.fs.get_file_info(pafs.FileSelector(dest.root, recursive=False)):
                    if leftover.base_name.startswith(f".staging-{cls.dir}-"):
                        dest.fs.delete_dir(leftover.path)
                staging = dest.path(f".staging-{cls.dir}-{uuid.uuid4().hex[:12]}")
                dest.fs.create_dir(staging, recursive=True)
                stagings.append(staging)
                store = RunStore(ctx.dest)
                store.root = staging
            else:  # object stores: no directory rename; clear, then upload each finished file whole
                from mmbalance.operators.export.upload import Uploader, UploadingStore

                if dest.exists(cls.dir):
                    dest.fs.delete_dir(dest.path(cls.dir))
                staging = tempfile.mkdtemp(prefix=f"mmbalance-export-{cls.dir}-")
                stagings.append(staging)
                uploaders[name] = Uploader(dest.fs, dest.path(cls.dir))
                store = UploadingStore(staging, uploaders[name])
            try:
                writers.append((name, cls(ctx, store), staging))
            except ExportSkipped as why:
                results[name] = {"skipped": str(why)}
        if writers:
            for rows in iter_rows(ctx, shards, any(w.needs_source for _, w, _ in writers)):
                for _, w, _ in writers:
                    w.write(rows)
        for name, w, staging in writers:
            summary = w.close()
            if "open_clip_args" in summary:
                summary["open_clip_script"] = _write_train_script(w, summary["open_clip_args"])
            if local:
                final = dest.path(w.dir)
                if dest.exists(w.dir):
                    dest.fs.delete_dir(final)
                dest.fs.move(staging, final)
            else:
                uploaders.pop(name).finish()
            results[name] = summary
    except BaseException:
        for _, w, _ in writers:
            w.abort()
        for uploader in uploaders.values():
            uploader.abort()
        raise
    finally:
        for staging in stagings:
            if local and dest.fs.get_file_info(staging).type != pafs.FileType.NotFound:
                dest.fs.delete_dir(staging)
            elif not local:
                shutil.rmtree(staging, ignore_errors=True)
    commands = {("webdataset" if name == "wids" else name): {k: v for k, v in summary.items()
                                                            if k in ("open_clip_args", "open_clip_command", "epoch")}
                for name, summary in results.items() if isinstance(summary, dict) and "open_clip_args" in summary}
    if commands:
        results["mixture"]["open_clip"] = commands
    dest.write_json("mixture.json", obj=results["mixture"])
    return results


def _write_train_script(writer, args: list[str]) -> str:
    """``train_open_clip.sh`` beside a format's files: open_clip_train with this export's data
    arguments, one per line, and the caller's own (model, epochs, ...) passed on; the command is
    too long to print usefully (thousands of characters with many domains)."""
    lines = ["#!/bin/sh", "# Written by `mmbalance export`: trains open_clip on this export.",
             "# Usage: sh train_open_clip.sh --model ViT-B-32 --epochs 1 [any open_clip_train argument]",
             'exec "${PYTHON:-python}" -m open_clip_train.main \\']
    i = 0
    while i < len(args):  # an option with its value on one line
        pair = args[i:i + 2] if i + 1 < len(args) and not args[i + 1].startswith("--") else args[i:i + 1]
        lines.append("  " + " ".join(shlex.quote(a) for a in pair) + " \\")
        i += len(pair)
    lines.append('  "$@"')
    with writer.store.atomic_output("train_open_clip.sh") as stream:
        stream.write(("\n".join(lines) + "\n").encode("utf-8"))
    return writer.ctx.dest_path(writer.dir, "train_open_clip.sh")


def load_formats() -> dict[str, type[Exporter]]:
    """Every format module of this package, imported once: each registers its classes
    (``base.register_format``), so a new format needs no list edited here."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return FORMATS


load_formats()
