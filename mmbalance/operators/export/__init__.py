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

import hashlib
import re
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mmbalance.io.source import format_of, open_shard, shard_info
from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.io.storage import configure_storage, ensure_bucket, s3_endpoint
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.export import EXPORT_FORMATS, ExportOptions
from mmbalance.schemas.recipe import Recipe, parse_recipe


class ExportSkipped(RuntimeError):
    """A format that cannot be written here (e.g. its optional library is not installed)."""


# -- names ------------------------------------------------------------------------------------------

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


def _domain_order(name: str) -> tuple:
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


# -- the run and its domains -------------------------------------------------------------------------


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
    _read_path: Callable[[str], bytes] | None = None
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
                        value = self._read_path(value)  # type: ignore[misc]
                    except OSError:
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


# -- reading ----------------------------------------------------------------------------------------


def _input_location(run_info: dict[str, Any], override: str | None, run_uri: str) -> tuple[pafs.FileSystem, str]:
    uri = override or run_info.get("input")
    if not uri:
        raise InputError(f"{run_uri}: run.json names no input; pass the shard directory with --input")
    fs, root = resolve_filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: source shards not found (pass --input where they are now)")
    if info.type == pafs.FileType.File:  # a run over a single file: relpaths are relative to its dir
        root = root.rsplit("/", 1)[0]
    return fs, root


def _domain_values(ctx_run: RunStore, opts: ExportOptions, column: str | None, shard_id: str, rows: np.ndarray) -> list[str]:
    """The domain of each manifest row (joined on ``row``); null -> the unlabeled domain."""
    if column is None:
        return ["all"] * len(rows)
    source = opts.domain.source
    if source == "tags" and ctx_run.exists("assign", f"{shard_id}.parquet"):
        # clusters and subclasses are tags too, assigned after the scan into assign/
        assigned = ctx_run.read_table("assign", f"{shard_id}.parquet")
        if column in assigned.column_names:
            source = "assign"
    try:
        table = ctx_run.read_table(source, f"{shard_id}.parquet")
    except FileNotFoundError:
        raise InputError(f"{ctx_run.uri}/{source}/{shard_id}.parquet: missing (export.domain.source = {source!r})") from None
    if column not in table.column_names or "row" not in table.column_names:
        have = [c for c in table.column_names if c != "row"]
        raise InputError(f"{ctx_run.uri}/{source}: no column {column!r} keyed by row (columns: {have})")
    table = table.select(["row", column])
    src_rows = table.column("row").to_numpy()
    order = np.argsort(src_rows, kind="stable")
    pos = np.searchsorted(src_rows, rows, sorter=order)
    pos = np.minimum(pos, len(src_rows) - 1) if len(src_rows) else pos
    found = order[pos] if len(src_rows) else np.array([], dtype=np.int64)
    if len(rows) and (len(src_rows) == 0 or np.any(src_rows[found] != rows)):
        raise InputError(f"{ctx_run.uri}/{source}/{shard_id}.parquet: manifest rows missing from the domain table")
    values = table.column(column).take(pa.array(found)).to_pylist()
    unlabeled = opts.domain.unlabeled
    return [unlabeled if v is None else str(v) for v in values]


def _read_source(fs: pafs.FileSystem, path: str, columns: list[str], rows: np.ndarray, batch_rows: int,
                 verify_checksums: bool = False, fmt: str = "auto") -> pa.Table:
    """``columns`` of the given (sorted) rows of one shard (Parquet or WebDataset), reading
    ``batch_rows`` at a time; ``verify_checksums`` checks Parquet page CRCs (``execution.verify_checksums``)."""
    parts = []
    with open_shard(fs, path, path, fmt, verify_checksums) as shard:
        missing = [c for c in columns if c not in shard.schema.names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r} (set export image_column/caption_column)")
        offset = 0
        for table in shard.batches(columns, batch_rows):
            lo, hi = np.searchsorted(rows, [offset, offset + table.num_rows])
            if hi > lo:
                parts.append(table.take(pa.array(rows[lo:hi] - offset)))
            offset += table.num_rows
            if hi == len(rows):
                break
    if not parts:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.concat_tables(parts)


def _image_values(column: pa.ChunkedArray) -> list[Any]:
    """bytes, {bytes, path} struct, or a path string -> bytes or path per row."""
    t = column.type
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        data = pc.struct_field(column, "bytes").to_pylist() if "bytes" in names else [None] * len(column)
        paths = pc.struct_field(column, "path").to_pylist() if "path" in names else [None] * len(column)
        return [d if d is not None else p for d, p in zip(data, paths)]
    return column.to_pylist()


# -- export -----------------------------------------------------------------------------------------


def load_run(out_dir: str) -> tuple[RunStore, dict[str, Any], list[dict[str, Any]], Recipe]:
    run = RunStore(out_dir)
    if not run.exists("run.json"):
        raise InputError(f"{out_dir}: not an mmbalance run (no run.json)")
    info = run.read_json("run.json")
    shards = run.read_json("shards.json")
    missing = [s["shard_id"] for s in shards if not run.exists("manifest", f"{s['shard_id']}.parquet")]
    if missing:
        raise InputError(f"{out_dir}: the run has no manifest for {len(missing)} shard(s) ({missing[0]}, ...); finish the run first")
    return run, info, shards, parse_recipe(info.get("recipe"), f"{out_dir}/run.json")


def _manifest(run: RunStore, shard_id: str) -> pa.Table:
    table = run.read_table("manifest", f"{shard_id}.parquet", columns=["uid", "weight", "repeats", "shard", "row"])
    check_manifest(run.path("manifest", f"{shard_id}.parquet"), table)
    return table.sort_by("row")


def check_manifest(path: str, table: pa.Table) -> None:
    """Refuse weights and repeats no run writes: a negative, NaN, infinite or missing weight; repeats
    that are not the weight rounded down or up (weigh's stochastic rounding); a row given twice."""
    weight = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    repeats = table.column("repeats").to_numpy(zero_copy_only=False).astype(np.float64)
    rows = table.column("row").to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        bad_weight = ~np.isfinite(weight) | (weight < 0)
        bad_repeats = ~np.isfinite(repeats) | (repeats < np.floor(weight)) | (repeats > np.floor(weight) + 1)
    _, first = np.unique(rows, return_index=True)
    repeated = np.setdiff1d(np.arange(len(rows)), first)
    problems = [(int(i), f"weight {weight[i]!r} is negative, NaN or infinite") for i in np.flatnonzero(bad_weight)[:1]]
    problems += [(int(i), f"repeats {repeats[i]:g} is not weight {weight[i]!r} rounded down or up")
                 for i in np.flatnonzero(bad_repeats & ~bad_weight)[:1]]
    problems += [(int(i), "the row is listed twice") for i in repeated[:1]]
    if problems:
        i, why = min(problems)
        raise InputError(f"{path} row {rows[i]}: {why}; not a manifest a run writes (rerun `mmbalance rebalance` "
                         "to rewrite it)")


HEX_UID = r"^[0-9a-fA-F]{1,32}$"  # what DataComp's resharder can key: divmod(int(uid, 16), 2**64)


def _check_hex_uids(run: RunStore, shard_id: str, m: pa.Table) -> None:
    kept = m.filter(pc.greater(m.column("repeats"), 0))
    ok = pc.match_substring_regex(kept.column("uid").cast(pa.string()), HEX_UID)
    bad = pc.invert(pc.fill_null(ok, False))
    if pc.any(bad).as_py():
        first = kept.filter(bad).slice(0, 1).to_pylist()[0]
        raise InputError(
            f"{run.uri}/manifest/{shard_id}.parquet row {first['row']}: uid {first['uid']!r} is not hex; DataComp's "
            "resharder keys samples by int(uid, 16) (set export.datacomp.non_hex_uids: sha256 to list SHA-256 keys instead)")


def _mixture(run: RunStore, shards, opts: ExportOptions, column: str | None, hex_uids: bool = False) -> list[Domain]:
    """Pass 1: per-domain counts and shares from the manifests and the domain column only (and,
    with ``hex_uids``, every kept uid checked before anything is written)."""
    acc: dict[str, Domain] = {}
    for s in shards:
        m = _manifest(run, s["shard_id"])
        if hex_uids:
            _check_hex_uids(run, s["shard_id"], m)
        rows = m.column("row").to_numpy()
        names = _domain_values(run, opts, column, s["shard_id"], rows)
        reps = m.column("repeats").to_numpy()
        wts = m.column("weight").to_numpy()
        if not names:
            continue
        uniq, inv = np.unique(np.array(names, dtype=object), return_inverse=True)
        for j, name in enumerate(uniq.tolist()):
            sel = inv == j
            d = acc.setdefault(name, Domain(name, ""))
            d.rows += int(sel.sum())
            kept = sel & (reps > 0)
            d.kept += int(kept.sum())
            d.repeats += int(reps[sel].sum())
            d.weight += float(wts[sel].sum())
            if kept.any():
                d.min_weight = min(d.min_weight, float(wts[kept].min()))
                d.max_weight = max(d.max_weight, float(wts[kept].max()))
    domains = sorted(acc.values(), key=lambda d: _domain_order(d.name))
    for d, dirname in zip(domains, safe_dir_names([d.name for d in domains])):
        d.dir = dirname
    total_w = sum(d.weight for d in domains)
    total_r = sum(d.repeats for d in domains)
    for d in domains:
        d.target_share = d.weight / total_w if total_w > 0 else 0.0
        d.effective_share = d.repeats / total_r if total_r > 0 else 0.0
    return domains


def _format_dirs(formats: list[str]) -> list[tuple[str, type[Exporter]]]:
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


def _iter_rows(ctx: ExportContext, shards, need_source: bool) -> Iterator[Rows]:
    index = {d.name: i for i, d in enumerate(ctx.domains)}
    for s in shards:
        m = _manifest(ctx.run, s["shard_id"])
        m = m.filter(pc.greater(m.column("repeats"), 0))
        if m.num_rows == 0:
            continue
        rows = m.column("row").to_numpy()
        names = _domain_values(ctx.run, ctx.options, ctx.domain_column, s["shard_id"], rows)
        uids = m.column("uid").to_pylist()
        batch = Rows(
            uid=uids,
            key=[sample_key(u) for u in uids],
            domain=np.array([index[n] for n in names], dtype=np.int64),
            repeats=m.column("repeats").to_numpy().astype(np.int64),
            weight=m.column("weight").to_numpy(),
            shard=s["relpath"],
            row=rows,
        )
        if need_source:
            cols = [c for c in (ctx.caption_column, ctx.image_column) if c]
            src = _read_source(ctx.input_fs, f"{ctx.input_root}/{s['relpath']}", cols, rows, ctx.options.batch_rows,
                               ctx.recipe.execution.verify_checksums, _shard_format(ctx.recipe, s))
            if ctx.caption_column:
                batch.caption = src.column(ctx.caption_column).to_pylist()
            if ctx.image_column:
                batch.image = _image_values(src.column(ctx.image_column))
                batch._read_path = lambda p, _s=s: _read_image_path(ctx, _s, p)
        yield batch


def resolve_image_path(ctx: ExportContext, relpath: str, path: str) -> str:
    """An image path from the corpus: absolute or a URI as is, else relative to its shard's directory."""
    if "://" in path or path.startswith("/"):
        return path
    shard_dir = f"{ctx.input_root}/{relpath}".rsplit("/", 1)[0]
    return f"{shard_dir}/{path}"


def _read_image_path(ctx: ExportContext, shard: dict[str, Any], path: str) -> bytes:
    full = resolve_image_path(ctx, shard["relpath"], path)
    fs, inner = (resolve_filesystem(full) if "://" in full else (ctx.input_fs, full))
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def _shard_format(recipe: Recipe, shard: dict[str, Any]) -> str:
    return shard.get("format") or format_of(shard["relpath"], recipe.input.format)


def _default_image_column(recipe: Recipe, fs: pafs.FileSystem, root: str, shards) -> str | None:
    if recipe.input.columns.image:
        return recipe.input.columns.image
    if not shards:
        return None
    path = f"{root}/{shards[0]['relpath']}"
    names = shard_info(fs, path, shards[0]["relpath"], _shard_format(recipe, shards[0]))[0].names
    return "image" if "image" in names else None


def trainer_url(url: str) -> str:
    """A shard URL as webdataset (open_clip's loader) opens it: local paths and http(s) as they are,
    object-store URIs through the store's command-line tool (webdataset has no s3:// or gs:// handler)."""
    if url.startswith("s3://"):
        endpoint = s3_endpoint()
        return f"pipe:aws {f'--endpoint-url {endpoint} ' if endpoint else ''}s3 cp {url} -"
    if url.startswith("gs://"):
        return f"pipe:gcloud storage cat {url}"
    return url


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
    plan = _format_dirs(list(formats))
    column = opts.domain.column_name()
    hex_uids = "datacomp" in formats and opts.datacomp.non_hex_uids == "error"
    domains = _mixture(run, shards, opts, column, hex_uids)
    total_repeats = sum(d.repeats for d in domains)
    need_source = any(cls.needs_source for _, cls in plan)
    if need_source:
        input_fs, input_root = _input_location(info, opts.input, out_dir)
    else:
        input_fs, input_root = pafs.LocalFileSystem(), ""
    caption = opts.caption_column or recipe.input.columns.caption
    image = opts.image_column or (_default_image_column(recipe, input_fs, input_root, shards) if need_source else None)
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
            for rows in _iter_rows(ctx, shards, any(w.needs_source for _, w, _ in writers)):
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


# formats register themselves on import
from mmbalance.operators.export import bigvision as _bigvision  # noqa: E402,F401
from mmbalance.operators.export import csv as _csv  # noqa: E402,F401
from mmbalance.operators.export import datacomp as _datacomp  # noqa: E402,F401
from mmbalance.operators.export import hf as _hf  # noqa: E402,F401
from mmbalance.operators.export import streaming as _streaming  # noqa: E402,F401
from mmbalance.operators.export import webdataset as _webdataset  # noqa: E402,F401
