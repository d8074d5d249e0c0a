"""Reading a finished run for export: the run and its recipe, the manifests (checked: weights and
repeats a run writes), the domain of each row, and the source columns (caption, image) of the kept
rows, one source shard at a time (bounded memory, never the corpus)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mmbalance.io.images import ImageSource
from mmbalance.io.source import format_of, open_shard, shard_info
from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.operators.export.base import Domain, ExportContext, Rows, domain_order, safe_dir_names, sample_key
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.export import ExportOptions
from mmbalance.schemas.recipe import Recipe, parse_recipe


def input_location(run_info: dict[str, Any], override: str | None, run_uri: str) -> tuple[pafs.FileSystem, str]:
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


def mixture(run: RunStore, shards, opts: ExportOptions, column: str | None, hex_uids: bool = False) -> list[Domain]:
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
    domains = sorted(acc.values(), key=lambda d: domain_order(d.name))
    for d, dirname in zip(domains, safe_dir_names([d.name for d in domains])):
        d.dir = dirname
    total_w = sum(d.weight for d in domains)
    total_r = sum(d.repeats for d in domains)
    for d in domains:
        d.target_share = d.weight / total_w if total_w > 0 else 0.0
        d.effective_share = d.repeats / total_r if total_r > 0 else 0.0
    return domains


def iter_rows(ctx: ExportContext, shards, need_source: bool) -> Iterator[Rows]:
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
                batch.images = ImageSource(ctx.input_fs, f"{ctx.input_root}/{s['relpath']}".rsplit("/", 1)[0])
                batch.image = [d if d is not None else p for d, p in batch.images.rows(src.column(ctx.image_column))]
        yield batch


def _shard_format(recipe: Recipe, shard: dict[str, Any]) -> str:
    return shard.get("format") or format_of(shard["relpath"], recipe.input.format)


def default_image_column(recipe: Recipe, fs: pafs.FileSystem, root: str, shards) -> str | None:
    if recipe.input.columns.image:
        return recipe.input.columns.image
    if not shards:
        return None
    path = f"{root}/{shards[0]['relpath']}"
    names = shard_info(fs, path, shards[0]["relpath"], _shard_format(recipe, shards[0]))[0].names
    return "image" if "image" in names else None
