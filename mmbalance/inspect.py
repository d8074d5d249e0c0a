"""``mmbalance inspect``: a terminal summary of a shard directory or of a run directory.

A shard directory is summarised from its Parquet footers (schema, rows, sizes, null counts) and a
bounded sample (at most ``sample_rows`` rows from at most ``sample_shards`` shards, tag-like columns
only); the corpus itself is never read. A run directory is summarised from its small files
(run.json, report.json, the merged signature tables, manifest footers, done markers).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.types as pat
from rich.console import Console
from rich.markup import escape

from mmbalance.console import count_text, join_uri, make_console, make_table, solver_lines
from mmbalance.operators.report import association_gaps, concept_balance
from mmbalance.operators.html import fmt
from mmbalance.io.source import has_page_checksums, read_source, shard_info
from mmbalance.pipeline.shards import discover_shards
from mmbalance.pipeline.stages import STAGES, stage
from mmbalance.io.store import RunStore
from mmbalance.schemas.contract import tag_column
from mmbalance.schemas.recipe import Recipe

SAMPLE_ROWS = 5000
SAMPLE_SHARDS = 8
MAX_TAG_VALUES = 64  # a sampled column with more distinct values is not treated as a tag
ATTRIBUTE_MAX_VALUES = 8  # without a recipe: tag columns with 2..8 values are attributes
TOP_VALUES = 8
TOP_PAIRS = 8


def inspect_path(path: str, recipe: Recipe | None = None, console: Console | None = None,
                 sample_rows: int = SAMPLE_ROWS, sample_shards: int = SAMPLE_SHARDS) -> dict[str, Any]:
    """Print a summary of PATH (a run if it holds run.json, else a shard directory); returns it as a dict."""
    console = console or make_console()
    store = RunStore(path)
    if store.exists("run.json"):
        return inspect_run(store, console)
    return inspect_shards(path, recipe, console, sample_rows, sample_shards)


# -- shard directory ---------------------------------------------------------------------------------

def _is_tag_type(t: pa.DataType) -> bool:
    if pat.is_dictionary(t):
        return _is_tag_type(t.value_type)
    return pat.is_string(t) or pat.is_large_string(t) or pat.is_integer(t) or pat.is_boolean(t)


def _type_name(t: pa.DataType) -> str:
    if pat.is_fixed_size_list(t):
        return f"{t.value_type}[{t.list_size}]"
    return str(t)


def _footer(fs, shard) -> dict[str, Any]:
    if shard.format != "parquet":  # a tar: columns from its first samples and side table, no statistics
        schema, rows = shard_info(fs, shard.path, shard.relpath, shard.format)
        return {"shard": shard, "rows": rows, "row_groups": 0, "schema": schema, "nulls": {n: None for n in schema.names},
                "page_checksums": None}  # a tar has no pages to check
    with fs.open_input_file(shard.path) as handle:
        meta = pq.ParquetFile(handle).metadata
        checksums = has_page_checksums(handle, meta)
    schema = meta.schema.to_arrow_schema()
    nulls: dict[str, int | None] = {}
    for name in schema.names:
        total: int | None = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            cols = [rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] == name]
            stats = cols[0].statistics if len(cols) == 1 else None
            if stats is None or not stats.has_null_count or total is None:
                total = None
                break
            total += stats.null_count
        nulls[name] = total
    return {"shard": shard, "rows": meta.num_rows, "row_groups": meta.num_row_groups, "schema": schema, "nulls": nulls,
            "page_checksums": checksums}


def _sample(fs, footers: list[dict], columns: list[str], sample_rows: int, sample_shards: int,
            verify_checksums: bool = False) -> pa.Table:
    """At most ``sample_rows`` rows of ``columns``, from the start of shards spread over the corpus;
    ``verify_checksums`` checks their page CRCs (the recipe's ``execution.verify_checksums``)."""
    nonempty = [f for f in footers if f["rows"] > 0]
    if not nonempty or not columns or sample_rows <= 0:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    k = min(sample_shards, len(nonempty))
    picked = [nonempty[round(i * (len(nonempty) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else nonempty[:1]
    per = max(1, sample_rows // k)
    parts = []
    for f in picked:
        present = [c for c in columns if c in f["schema"].names]
        shard = f["shard"]
        table = next(read_source(fs, shard.path, shard.relpath, present, per, shard.format, verify_checksums), None)
        if table is None:
            continue
        for c in columns:
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        cast = [pc_to_string(table.column(c)) for c in columns]
        parts.append(pa.table(dict(zip(columns, cast))))
    return pa.concat_tables(parts) if parts else pa.table({c: pa.array([], pa.string()) for c in columns})


def checksum_warning(unchecked: list[str], shards: int) -> str:
    """The shards whose pages carry no CRC: a flipped bit in them reads back as a wrong value."""
    return (f"page checksums: none in {len(unchecked):,} of {shards:,} shards ({escape(unchecked[0])}"
            f"{', ...' if len(unchecked) > 1 else ''}): a flipped bit there reads back as a wrong value, unseen; "
            "rewrite them with page checksums (pyarrow: write_page_checksum=True) to have it caught")


def pc_to_string(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pat.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return col.cast(pa.string())


def _roles(recipe: Recipe | None, frame: pl.DataFrame, candidates: list[str], uid: str | None) -> tuple[list[str], list[str], str]:
    """(attribute columns, label columns, how they were chosen)."""
    if recipe is not None and (recipe.attributes or recipe.labels):
        attrs = [a.source_column for a in recipe.attributes if a.source == "column"]
        labels = [lab.source_column for lab in recipe.labels if "column" in lab.sources]
        return [c for c in attrs if c in frame.columns], [c for c in labels if c in frame.columns], "from the recipe"
    attrs, labels = [], []
    for c in candidates:
        if c == uid:
            continue
        values = frame[c].drop_nulls()
        distinct = values.n_unique()
        if distinct < 2 or distinct > MAX_TAG_VALUES or distinct > 0.5 * len(values):
            continue
        (attrs if distinct <= ATTRIBUTE_MAX_VALUES else labels).append(c)
    return attrs, labels, f"guessed: <= {ATTRIBUTE_MAX_VALUES} values are attributes, <= {MAX_TAG_VALUES} labels; pass --recipe to name them"


def _prevalence(frame: pl.DataFrame, column: str) -> dict[str, Any]:
    values = frame[column]
    carrying = values.drop_nulls()
    counts = carrying.value_counts(sort=True)
    n = len(carrying)
    top = [(str(v), int(c), c / n) for v, c in counts.head(TOP_VALUES).iter_rows()] if n else []
    return {"rows": len(values), "carrying": n, "distinct": counts.height, "top": top}


def inspect_shards(path: str, recipe: Recipe | None, console: Console, sample_rows: int = SAMPLE_ROWS,
                   sample_shards: int = SAMPLE_SHARDS) -> dict[str, Any]:
    extensions = recipe.input.extensions if recipe else (".parquet",)
    fs, shards = discover_shards(path, extensions, recipe.input.format if recipe else "auto")
    with ThreadPoolExecutor(max_workers=8) as pool:
        footers = list(pool.map(lambda s: _footer(fs, s), shards))
    rows = sum(f["rows"] for f in footers)
    columns: dict[str, dict[str, Any]] = {}
    for f in footers:
        for field in f["schema"]:
            c = columns.setdefault(field.name, {"type": _type_name(field.type), "shards": 0, "nulls": 0, "tag_type": _is_tag_type(field.type)})
            c["shards"] += 1
            n = f["nulls"].get(field.name)
            c["nulls"] = None if n is None or c["nulls"] is None else c["nulls"] + n
    summary: dict[str, Any] = {
        "kind": "shards", "path": path, "shards": len(shards), "rows": rows,
        "bytes": sum(s.size for s in shards), "row_groups": sum(f["row_groups"] for f in footers), "columns": columns,
    }
    console.print(f"[bold]{escape(path)}[/bold]: {fmt(len(shards))} shards, {fmt(rows)} rows, {fmt(summary['row_groups'])} row groups, "
                  f"{summary['bytes'] / 2**20:,.1f} MiB (from the {'Parquet footers' if shards[0].format == 'parquet' else 'tars and side tables'})")
    table = make_table("schema", [("column", "left"), ("type", "left"), ("in shards", "right"), ("nulls", "right")])
    for name, c in columns.items():
        table.add_row(escape(name), escape(c["type"]), f"{c['shards']}/{len(shards)}", "?" if c["nulls"] is None else fmt(c["nulls"]))
    console.print(table)
    unchecked = [f["shard"].relpath for f in footers if f["page_checksums"] is False]
    summary["shards_without_page_checksums"] = len(unchecked)
    if unchecked:
        console.print(f"[yellow]{checksum_warning(unchecked, len(shards))}[/yellow]", soft_wrap=True)

    uid = recipe.input.columns.uid if recipe else ("uid" if "uid" in columns else None)
    candidates = [n for n, c in columns.items() if c["tag_type"]]
    if recipe is not None:
        candidates = list(dict.fromkeys(candidates + [s.source_column for s in [*recipe.attributes, *recipe.labels] if "column" in s.sources and s.source_column in columns]))
    verify = recipe.execution.verify_checksums if recipe else True  # the default
    sample = pl.from_arrow(_sample(fs, footers, candidates, sample_rows, sample_shards, verify))
    attrs, labels, how = _roles(recipe, sample, candidates, uid)
    picked_from = min(sample_shards, sum(1 for f in footers if f["rows"] > 0))
    summary.update(sample_rows=sample.height, sample_shards=picked_from, attributes=attrs, labels=labels)
    console.print(f"sample: the first {fmt(sample.height)} rows of {picked_from} shards spread over the corpus; tag columns {how}")
    summary["prevalence"] = {c: _prevalence(sample, c) for c in [*attrs, *labels]}
    _print_prevalence(console, summary["prevalence"], "tag prevalence (sample)")

    frame = sample.rename({c: tag_column(c) for c in [*attrs, *labels]}).with_columns(pl.lit(1).alias("count"))
    pairs = []
    for a in attrs:
        values = sorted(frame[tag_column(a)].drop_nulls().unique().to_list())
        for lab in labels:
            if lab == a:
                continue
            label_values = sorted(frame[tag_column(lab)].drop_nulls().unique().to_list())
            gaps = association_gaps(frame, "count", a, values, lab, label_values, worst=2 * TOP_PAIRS)
            pairs += [{"attribute": a, "label": lab, "value": p["value"], "label_value": p["label"], "gap": p["gap"]} for p in gaps["worst_pairs"]]
    pairs.sort(key=lambda p: (-abs(p["gap"]), p["attribute"], p["label"], p["label_value"], p["value"]))
    two = {a for a in attrs if frame[tag_column(a)].drop_nulls().n_unique() == 2}
    summary["associations"] = _one_per_mirror(pairs, two, TOP_PAIRS)
    if pairs:
        t = make_table("top associations (sample): gap = P(label | value) - P(label | other values)",
                       [("attribute = value", "left"), ("label", "left"), ("gap", "right")])
        for p in summary["associations"]:
            t.add_row(escape(f"{p['attribute']} = {p['value']}"), escape(f"{p['label']} = {p['label_value']}"), fmt(p["gap"]))
        console.print(t)

    summary["sizes"] = {lab: concept_balance(frame, "count", lab) for lab in labels}
    _print_sizes(console, {lab: {"sample": s} for lab, s in summary["sizes"].items()}, "label / cluster sizes (sample)")
    return summary


# -- run directory -----------------------------------------------------------------------------------

def _one_per_mirror(pairs: list[dict[str, Any]], two_valued: set[str], top: int) -> list[dict[str, Any]]:
    """With a two-valued attribute the gaps of its values are mirror images: keep one per label value."""
    out, seen = [], set()
    for p in pairs:
        key = (p["attribute"], p["label"], p["label_value"])
        if p["attribute"] in two_valued and key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out[:top]


def _print_prevalence(console: Console, prevalence: dict[str, dict[str, Any]], title: str) -> None:
    if not prevalence:
        return
    t = make_table(title, [("tag", "left"), ("with a value", "right"), ("distinct", "right"), ("top values (share of rows with a value)", "left")])
    for col, p in prevalence.items():
        top = escape(", ".join(f"{v}\u00a0{fmt(s)}" for v, _, s in p["top"]))  # a value and its share never part
        t.add_row(escape(col), f"{count_text(p['carrying'])}/{count_text(p['rows'])}", fmt(p["distinct"]), top)
    console.print(t)


def _print_sizes(console: Console, sizes: dict[str, dict[str, dict[str, Any]]], title: str) -> None:
    if not sizes:
        return
    t = make_table(title, [("label", "left"), ("view", "left"), ("values", "right"), ("largest", "right"), ("smallest", "right"),
                           ("gini", "right"), ("entropy", "right"), ("top 1%", "right")])
    for lab, views in sizes.items():
        for view, s in views.items():
            t.add_row(escape(lab), view, fmt(s["values"]), count_text(s["largest"]), count_text(s["smallest"]), f"{s['gini']:.4f}",
                      f"{s['normalized_entropy']:.4f}", f"{s['top1pct_share']:.4f}")
    console.print(t)
    console.print("gini: 0 = equal sizes; entropy: normalised, 1 = equal sizes; top 1%: share of rows in the largest 1% of values")


def _signature_prevalence(table: pa.Table, weight: str) -> dict[str, dict[str, Any]]:
    frame = pl.from_arrow(table)
    total = frame[weight].sum() if frame.height else 0
    out = {}
    for col in [c for c in frame.columns if c.startswith("tag.")]:
        by = frame.filter(pl.col(col).is_not_null()).group_by(col).agg(pl.col(weight).sum().alias("w")).sort(["w", col], descending=[True, False])
        carrying = by["w"].sum()
        out[col[len("tag."):]] = {
            "rows": total, "carrying": carrying, "distinct": by.height,
            "top": [(str(v), w, w / carrying) for v, w in by.head(TOP_VALUES).iter_rows()] if carrying else [],
        }
    return out


def _stage_progress(store: RunStore) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
    """Finished units per declared stage (from the done markers, in stage order) and the units a
    deferred run recorded as failed (execution.on_unit_error: defer)."""
    done: dict[str, int] = {}
    failed: dict[str, list[dict[str, Any]]] = {}
    for declared in STAGES:
        n = len(store.list_files("_done", declared.name, suffix=".json"))
        if n:
            done[declared.name] = n
        names = store.list_files("_failed", declared.name, suffix=".json")
        if names:
            failed[declared.name] = [store.read_json("_failed", declared.name, name) for name in names]
    return done, failed


def inspect_run(store: RunStore, console: Console) -> dict[str, Any]:
    run = store.read_json("run.json")
    recipe = run.get("recipe", {})
    steps = recipe.get("balance", {})
    method = "+".join(s.get("method", "?") for s in steps) if isinstance(steps, list) else steps.get("method", "?")  # composed steps
    summary: dict[str, Any] = {"kind": "run", "path": store.uri, "method": method, "input": run.get("input"),
                               "shards": run.get("shards"), "input_rows": run.get("input_rows")}
    console.print(f"[bold]{escape(store.uri)}[/bold]: mmbalance run ({escape(method)}) of {escape(str(run.get('input')))}: {fmt(run.get('shards', 0))} shards, "
                  f"{fmt(run.get('input_rows', 0))} rows; input fingerprint {run.get('input_fingerprint')}, "
                  f"recipe {run.get('recipe_fingerprint')}")
    done, failed = _stage_progress(store)
    summary["done"], summary["failed"] = done, failed
    if done:

        shards = run.get("shards")
        console.print("finished units: " + ", ".join(
            f"{k} {v}/{shards}" if stage(k).unit == "shard" and shards else f"{k} {v}" for k, v in done.items()))
    for stage_name, units in failed.items():  # not `stage`: that name is the declaration lookup above
        console.print(f"[red]failed {stage_name} units: {len(units)}[/red] (first: {escape(units[0]['reason'])}); "
                      "rerun the same command to retry them")

    manifest_files = store.list_files("manifest", suffix=".parquet")
    manifest_rows = 0
    schema = None
    with ThreadPoolExecutor(max_workers=8) as pool:  # every file inspect reads is checked against its done marker
        list(pool.map(lambda name: store.verify("manifest", name), manifest_files))
    for name in manifest_files:
        meta = pq.ParquetFile(store.path("manifest", name), filesystem=store.fs).metadata
        manifest_rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
    summary.update(manifest_files=len(manifest_files), manifest_rows=manifest_rows)
    if schema is not None:
        console.print(f"manifest: {fmt(len(manifest_files))} files, {fmt(manifest_rows)} rows; columns "
                      + ", ".join(f"{f.name}: {_type_name(f.type)}" for f in schema))

    report = store.read_json("report.json") if store.exists("report.json") else None
    summary["report"] = report is not None
    if report is None:
        console.print("[yellow]no report.json: the run has not finished; rerun the same command to resume[/yellow]")
        return summary
    rows, w = report["rows"], report["weights"]
    summary["rows"] = rows
    summary["weights"] = w
    t = make_table("rows", [("", "left"), ("rows", "right")])
    t.add_row("input", fmt(rows["input"]))
    t.add_row("manifest", fmt(rows["manifest"]))
    t.add_row("rejected", fmt(rows["rejected"]))
    for reason, n in rows["rejected_by_reason"].items():
        t.add_row(f"  {reason}", fmt(n))
    t.add_row("kept, expected (sum of weights)", count_text(w["expected_rows"]))
    t.add_row("kept, realised (sum of repeats)", fmt(w["realized_rows"]))
    t.add_row("retention (expected)", fmt(w["retention"]))
    t.add_row("ESS (expected), (sum w)^2 / sum w^2", count_text(w["ess"]))
    t.add_row("largest repeat count", fmt(w["max_repeats"]))
    console.print(t)

    before = store.read_table("signatures", "merged.parquet") if store.exists("signatures", "merged.parquet") else None
    after = store.read_table("after", "merged.parquet") if store.exists("after", "merged.parquet") else None
    if before is not None:
        summary["prevalence_before"] = _signature_prevalence(before, "count")
        _print_prevalence(console, summary["prevalence_before"], "tag prevalence before (rows)")
    if after is not None:
        summary["prevalence_after"] = _signature_prevalence(after, "w_sum")
        _print_prevalence(console, summary["prevalence_after"], "tag prevalence after (expected weights)")

    pairs = []
    for i, a in enumerate(report["before"]["association"]):
        after_gaps = report["after_expected"]["association"][i]["gaps"]
        for p in a["worst_pairs"]:
            pairs.append({"attribute": a["attribute"], "label": a["label"], "value": p["value"], "label_value": p["label"],
                          "before": p["gap"], "after": after_gaps[p["value"]][p["label"]]})
    pairs.sort(key=lambda p: (-abs(p["before"]), p["attribute"], p["label_value"], p["value"]))
    two = {a["attribute"] for a in report["before"]["association"] if len(a["gaps"]) == 2}
    summary["associations"] = _one_per_mirror(pairs, two, TOP_PAIRS)
    if pairs:
        t = make_table("top associations: gap = P(label | value) - P(label | other values), weighted",
                       [("attribute = value", "left"), ("label", "left"), ("before", "right"), ("after (E)", "right")])
        for p in summary["associations"]:
            t.add_row(escape(f"{p['attribute']} = {p['value']}"), escape(f"{p['label']} = {p['label_value']}"), fmt(p["before"]), fmt(p["after"]))
        console.print(t)
    views = (("before", "before"), ("after_expected", "after E"), ("after_realized", "after rep."))
    sizes = {lab: {name: report[key]["concept_balance"][lab] for key, name in views} for lab in report["before"]["concept_balance"]}
    summary["sizes"] = sizes
    _print_sizes(console, sizes, "label / cluster sizes")
    if report.get("solution"):
        for line in solver_lines(report["solution"], report.get("method", "")):
            console.print(escape(line))
    if store.exists("report.html"):
        console.print(f"report: {store.uri_of('report.html')}")
    return summary
