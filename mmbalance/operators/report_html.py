"""OUT/report.html: one self-contained page (inline CSS, plots as base64 PNG) built from a finished run.

Inputs are the small files of the run (report.json, run.json, stats/stages.json, the merged signature
tables) plus two bounded streaming passes: the manifest, shard by shard, for the weight and repeat
histograms, and a few rows of rejects/ as examples. Every figure copied from report.json goes through
``num`` so it carries ``data-key`` (a JSON pointer into report.json) and is formatted by ``fmt``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.pipeline.store import RunStore
from mmbalance.schemas.contract import InputError, tag_column

HIST_BINS = 40
HEATMAP_MAX_LABELS = 40
REJECT_EXAMPLES = 5
# Known top-level keys of report.json; any other key gets a generic section so new stages show up.
_KNOWN = {
    "after_expected", "after_realized", "before", "input", "method", "rows", "solution",
    "stage_seconds", "vocabulary_sizes", "weights", "audit", "constraint_families", "coverage",
}
_VIEWS = (("before", "count", "before"), ("after_expected", "w_sum", "after (E)"), ("after_realized", "rep_sum", "after (repeats)"))
_COLORS = {"before": "#9aa5b1", "after (E)": "#1f6feb", "after (repeats)": "#7ee2b8", "target": "#d73a49"}


# -- formatting ------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    """The one formatter for every figure on the page."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.1f}"
        if abs(x) < 1e-3:
            return f"{x:.3e}"
        return f"{x:.4f}"
    return str(value)


def pointer(*parts: Any) -> str:
    """JSON pointer (RFC 6901) to a value in report.json."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(doc: Any, ptr: str) -> Any:
    for raw in ptr.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def num(value: Any, ptr: str | None = None) -> str:
    """A formatted number; with ``ptr`` it is marked as the value at that pointer in report.json."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return html.escape(fmt(value))
    attrs = f' data-key="{html.escape(ptr)}" data-value="{float(value)!r}"' if ptr else ""
    return f'<span class="n"{attrs}>{html.escape(fmt(value))}</span>'


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def render_any(obj: Any, ptr: str, depth: int = 0) -> str:
    """Generic rendering of diagnostics: scalars as key/value rows, dicts of numbers and lists of
    records as tables, anything else recursively. New solver or audit keys need no code here."""
    if isinstance(obj, dict):
        if not obj:
            return '<p class="muted">(empty)</p>'
        values = list(obj.values())
        if all(isinstance(v, dict) and v and all(_is_number(x) or x is None for x in v.values()) for v in values):
            cols: list[str] = []
            for v in values:
                cols += [c for c in v if c not in cols]
            rows = [[_e(k)] + [num(v[c], pointer_join(ptr, k, c)) if c in v and v[c] is not None else "" for c in cols] for k, v in obj.items()]
            return _table([""] + [_e(c) for c in cols], rows, "kv")
        scalars = [(k, v) for k, v in obj.items() if not isinstance(v, (dict, list))]
        nested = [(k, v) for k, v in obj.items() if isinstance(v, (dict, list))]
        out = ""
        if scalars:
            out += _table(["key", "value"], [[_e(k), num(v, pointer_join(ptr, k)) if _is_number(v) else _e(fmt(v))] for k, v in scalars], "kv")
        for k, v in nested:
            out += f'<div class="nested"><h4>{_e(k)}</h4>{render_any(v, pointer_join(ptr, k), depth + 1)}</div>'
        return out
    if isinstance(obj, list):
        if not obj:
            return '<p class="muted">(none)</p>'
        if all(isinstance(x, dict) and all(not isinstance(v, (dict, list)) for v in x.values()) for x in obj):
            cols = []
            for x in obj:
                cols += [c for c in x if c not in cols]
            rows = [[num(x[c], pointer_join(ptr, i, c)) if _is_number(x.get(c)) else _e(fmt(x.get(c, ""))) for c in cols] for i, x in enumerate(obj)]
            return _table([_e(c) for c in cols], rows, "kv")
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "<p>" + ", ".join(num(x, pointer_join(ptr, i)) if _is_number(x) else _e(fmt(x)) for i, x in enumerate(obj)) + "</p>"
        return "".join(f'<div class="nested"><h4>[{i}]</h4>{render_any(x, pointer_join(ptr, i), depth + 1)}</div>' for i, x in enumerate(obj))
    return f"<p>{num(obj, ptr) if _is_number(obj) else _e(fmt(obj))}</p>"


def pointer_join(ptr: str, *parts: Any) -> str:
    return ptr + pointer(*parts)


# -- plots -----------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
    return plt


def _png(fig, alt: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def plot_prevalence(report: dict[str, Any], attr: str) -> str:
    plt = _plt()
    rep = {name: report[key]["representation"][attr] for key, _, name in _VIEWS}
    values = list(rep["before"]["share"])
    x = np.arange(len(values))
    width = 0.26
    fig, ax = plt.subplots(figsize=(max(3.4, 0.8 * len(values) + 1.6), 2.8))
    for i, (name, r) in enumerate(rep.items()):
        ax.bar(x + (i - 1) * width, [r["share"][v] for v in values], width, label=name, color=_COLORS[name])
    target = rep["before"]["target"]
    for j, v in enumerate(values):
        ax.hlines(target[v], j - 1.6 * width, j + 1.6 * width, colors=_COLORS["target"], linewidth=2, label="target" if j == 0 else None)
    ax.set_xticks(x, values, rotation=30 if len(values) > 6 else 0, ha="right" if len(values) > 6 else "center")
    top = max([target[v] for v in values] + [r["share"][v] for r in rep.values() for v in values] + [0.01])
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel(f"share of rows with {attr}")
    ax.set_title(f"{attr}: prevalence vs target")
    ax.legend(fontsize=7, frameon=False, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14 if len(values) <= 6 else -0.3))
    return _png(fig, f"{attr} prevalence before and after against targets")


def plot_worst_pairs(report: dict[str, Any], index: int, top: int = 8) -> str:
    """Horizontal bars of the largest |gaps| before, next to the same pairs after."""
    plt = _plt()
    before, after = report["before"]["association"][index], report["after_expected"]["association"][index]
    pairs: list[tuple[str, str]] = []
    binary = len(before["gaps"]) == 2  # the two rows mirror each other: one pair per label
    for p in before["worst_pairs"]:
        if len(pairs) < top and not (binary and any(r == p["label"] for _, r in pairs)):
            pairs.append((p["value"], p["label"]))
    y = np.arange(len(pairs))
    fig, ax = plt.subplots(figsize=(4.2, 0.28 * len(pairs) + 1.2))
    ax.barh(y + 0.2, [before["gaps"][v][r] for v, r in pairs], 0.4, color=_COLORS["before"], label="before")
    ax.barh(y - 0.2, [after["gaps"][v][r] for v, r in pairs], 0.4, color=_COLORS["after (E)"], label="after (E)")
    ax.set_yticks(y, [f"{v} | {r}" for v, r in pairs])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("E[label | value] - E[label | other values]")
    ax.set_title(f"worst {before['attribute']} x {before['label']} gaps")
    ax.legend(fontsize=7, frameon=False)
    return _png(fig, "worst association gaps before and after")


def plot_heatmaps(report: dict[str, Any], index: int) -> tuple[str, int]:
    plt = _plt()
    tables = [(name, report[key]["association"][index]["gaps"]) for key, _, name in _VIEWS[:2]]
    values = list(tables[0][1])
    labels = list(next(iter(tables[0][1].values()), {}))
    # the labels with the largest gap before or after, when there are too many to show
    score = {r: max(abs(t[v].get(r, 0.0)) for _, t in tables for v in values) for r in labels}
    shown = sorted(labels, key=lambda r: (-score[r], r))[:HEATMAP_MAX_LABELS]
    shown.sort(key=lambda r: -max(abs(tables[0][1][v].get(r, 0.0)) for v in values))
    mats = [np.array([[t[v].get(r, 0.0) for r in shown] for v in values]) for _, t in tables]
    vmax = max(float(np.abs(m).max()) if m.size else 0.0 for m in mats) or 1.0
    fig, axes = plt.subplots(len(mats), 1, figsize=(max(5.0, 0.42 * len(shown) + 2.0), 0.45 * len(values) * len(mats) + 1.6),
                             squeeze=False, sharex=True)
    im = None
    for ax, (name, _), m in zip(axes[:, 0], tables, mats):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(values)), values)
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=7)
        ax.tick_params(axis="x", labelbottom=ax is axes[-1, 0])
        ax.set_title(name, loc="left", fontsize=9)
        if len(shown) * len(values) <= 120:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=6, color="white" if abs(m[i, j]) > 0.6 * vmax else "black")
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.8, label="gap")
    return _png(fig, "association gap heatmaps before and after"), len(labels) - len(shown)


def label_sizes(before: pa.Table, after: pa.Table, label: str) -> dict[str, np.ndarray]:
    """Weight per label value, largest first, for each view (unlabeled rows excluded)."""
    col = tag_column(label)
    out = {}
    for (key, weight, name), table in zip(_VIEWS, (before, after, after)):
        if col not in table.column_names or weight not in table.column_names:
            continue
        frame = pl.from_arrow(table.select([col, weight]))
        sizes = frame.filter(pl.col(col).is_not_null()).group_by(col).agg(pl.col(weight).sum())[weight].to_numpy().astype(float)
        out[name] = np.sort(sizes[sizes > 0])[::-1]
    return out


def plot_rank(sizes: dict[str, np.ndarray], label: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    for name, s in sizes.items():
        if len(s):
            ax.loglog(np.arange(1, len(s) + 1), s, marker="o" if len(s) <= 60 else None, markersize=3, label=name, color=_COLORS[name])
    ax.set_xlabel(f"rank of {label} value")
    ax.set_ylabel("rows (weight)")
    ax.set_title(f"{label}: size by rank (log-log)")
    ax.legend(fontsize=7, frameon=False)
    return _png(fig, f"{label} size distribution by rank")


def plot_histograms(hist: dict[str, Any]) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 2.6))
    edges, counts = hist["weight_edges"], hist["weight_counts"]
    axes[0].bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=_COLORS["after (E)"])
    if np.any(np.asarray(counts) > 0):  # a log axis needs a positive bar (an all-rejected run has none)
        axes[0].set_yscale("log")
        axes[0].set_ylim(bottom=0.8)
    axes[0].set_xlabel("weight (expected repeats)")
    axes[0].set_ylabel("rows")
    axes[0].set_title("weights")
    reps = hist["repeat_counts"]
    axes[1].bar(np.arange(len(reps)), reps, color=_COLORS["after (repeats)"])
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    if np.any(np.asarray(reps) > 0):
        axes[1].set_yscale("log")
        axes[1].set_ylim(bottom=0.8)
    axes[1].set_xlabel("repeats")
    axes[1].set_title("realised repeats")
    return _png(fig, "histograms of weights and repeats")


def plot_timings(seconds: dict[str, float]) -> str:
    plt = _plt()
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(4.4, 0.25 * len(names) + 0.9))
    ax.barh(names, [seconds[n] for n in names], color="#6e7781")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (wall)")
    return _png(fig, "stage timings")


def plot_rejects(reasons: dict[str, int]) -> str:
    plt = _plt()
    names = list(reasons)
    fig, ax = plt.subplots(figsize=(4.4, 0.25 * len(names) + 0.9))
    ax.barh(names, [reasons[n] for n in names], color=_COLORS["target"])
    ax.invert_yaxis()
    ax.set_xlabel("rows rejected")
    return _png(fig, "rejects by reason")


# -- streaming passes over the run -----------------------------------------------------------------

def manifest_histograms(store: RunStore, bins: int = HIST_BINS, batch_rows: int = 65536) -> dict[str, Any]:
    """Histogram of weights and of repeats, accumulated batch by batch (memory: one batch)."""
    files = store.list_files("manifest", suffix=".parquet")
    hi = 0.0
    for name in files:  # the range from footer statistics; a full pass only if a footer lacks them
        meta = pq.ParquetFile(store.path("manifest", name), filesystem=store.fs).metadata
        idx = meta.schema.to_arrow_schema().get_field_index("weight")
        for g in range(meta.num_row_groups):
            col = meta.row_group(g).column(idx)
            if col.statistics is not None and col.statistics.has_min_max:
                hi = max(hi, float(col.statistics.max))
            elif meta.row_group(g).num_rows:
                hi = max(hi, float(pq.read_table(store.path("manifest", name), filesystem=store.fs, columns=["weight"])["weight"].to_numpy().max()))
                break
    edges = np.linspace(0.0, hi if hi > 0 else 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    repeats = np.zeros(1, dtype=np.int64)
    rows, w_sum, w2_sum, rep_sum, zero = 0, 0.0, 0.0, 0, 0
    for name in files:
        pfile = pq.ParquetFile(store.path("manifest", name), filesystem=store.fs)
        for batch in pfile.iter_batches(batch_size=batch_rows, columns=["weight", "repeats"]):
            w = batch.column(0).to_numpy(zero_copy_only=False).astype(np.float64)
            r = batch.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
            counts += np.histogram(w, bins=edges)[0]
            bc = np.bincount(r)
            if len(bc) > len(repeats):
                repeats = np.pad(repeats, (0, len(bc) - len(repeats)))
            repeats[: len(bc)] += bc
            rows += len(w)
            w_sum += float(w.sum())
            w2_sum += float((w * w).sum())
            rep_sum += int(r.sum())
            zero += int((w == 0).sum())
    return {
        "files": len(files), "rows": rows, "weight_sum": w_sum, "weight2_sum": w2_sum, "repeat_sum": rep_sum,
        "zero_weight_rows": zero, "weight_edges": edges, "weight_counts": counts, "repeat_counts": repeats,
    }


def reject_examples(store: RunStore, reasons: list[str], per_reason: int = REJECT_EXAMPLES, max_files: int = 50) -> dict[str, list[dict]]:
    """A few rejected rows per reason, reading at most ``max_files`` reject files."""
    out: dict[str, list[dict]] = {r: [] for r in reasons}
    seen = 0
    for stage in sorted(p for p in _subdirs(store, "rejects")):
        for name in store.list_files("rejects", stage, suffix=".parquet"):
            if seen >= max_files or all(len(v) >= per_reason for v in out.values()):
                return out
            seen += 1
            table = store.read_table("rejects", stage, name)
            for row in table.slice(0, 2000).to_pylist():
                # row reasons carry details ("duplicate uid: first seen in ..."); group by the summary reason
                key = max((r for r in reasons if row["reason"].startswith(r)), key=len, default=row["reason"])
                bucket = out.setdefault(key, [])
                if len(bucket) < per_reason:
                    bucket.append(row)
    return out


def _subdirs(store: RunStore, *parts: str) -> list[str]:
    import pyarrow.fs as pafs

    base = store.path(*parts)
    if store.fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    return [f.base_name for f in store.fs.get_file_info(pafs.FileSelector(base)) if f.type == pafs.FileType.Directory]


# -- the page --------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 24px}header h1{font-size:20px;margin:0}
header .sub{color:#c9d1d9;font-size:12px;margin-top:3px}main{padding:10px 24px 40px}
nav{font-size:12px;margin:6px 0 10px}nav a{margin-right:12px;color:#0969da;text-decoration:none}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 16px;margin:12px 0}
h2{font-size:16px;margin:4px 0 8px}h3{font-size:14px;margin:10px 0 6px}h4{font-size:12px;margin:8px 0 4px}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;min-width:130px}
.card .t{font-size:11px;color:#57606a;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:19px;font-weight:600}.card .d{font-size:11px;color:#57606a}
.good{color:#1a7f37}.bad{color:#cf222e}.muted{color:#57606a;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
table{border-collapse:collapse;font-size:12px;margin:4px 0 8px}th,td{border-bottom:1px solid #eaeef2;padding:2px 10px;text-align:left}
th{background:#f6f8fa}td .n,td.n{font-variant-numeric:tabular-nums}img.plot{max-width:100%;display:block}
pre{background:#f6f8fa;padding:8px;font-size:11px;overflow:auto;max-height:420px}.ok{color:#1a7f37;font-weight:600}
.nested{margin-left:10px}
.glance{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px;align-items:start}
.glance img.plot{width:100%;height:auto}
"""


def _arrow(before: float, after: float, lower_is_better: bool = True) -> str:
    if abs(after - before) < 1e-12:
        return ""
    better = (after < before) == lower_is_better
    return f' <span class="{"good" if better else "bad"}">{"&#9660;" if after < before else "&#9650;"}</span>'


def _card(title: str, value: str, detail: str = "") -> str:
    return f'<div class="card"><div class="t">{_e(title)}</div><div class="v">{value}</div><div class="d">{detail}</div></div>'


def _before_after_card(report: dict[str, Any], title: str, *path: Any, lower_is_better: bool = True) -> str:
    b, a, r = (resolve(report, pointer(view, *path)) for view in ("before", "after_expected", "after_realized"))
    return _card(
        title,
        f'{num(b, pointer("before", *path))} &rarr; {num(a, pointer("after_expected", *path))}{_arrow(b, a, lower_is_better)}',
        f'before &rarr; after (E); repeats: {num(r, pointer("after_realized", *path))}',
    )


def _summary(report: dict[str, Any]) -> str:
    rows, w = report["rows"], report["weights"]
    cards = [
        _card("input rows", num(rows["input"], "/rows/input"),
              f'{num(rows["manifest"], "/rows/manifest")} manifest + {num(rows["rejected"], "/rows/rejected")} rejected'),
        _card("kept (expected)", num(w["expected_rows"], "/weights/expected_rows"),
              f'retention {num(w["retention"], "/weights/retention")}; realised {num(w["realized_rows"], "/weights/realized_rows")}'),
        _card("effective sample size", num(w["ess"], "/weights/ess"),
              f'realised {num(w["realized_ess"], "/weights/realized_ess")}; max repeats {num(w["max_repeats"], "/weights/max_repeats")}'),
        _before_after_card(report, "RB (max |target - share|)", "rb"),
        _before_after_card(report, "AB (max association gap)", "ab"),
    ]
    for label in report["before"]["concept_balance"]:
        cards.append(_before_after_card(report, f"{label} gini", "concept_balance", label, "gini"))
        cards.append(_before_after_card(report, f"{label} top-1% share", "concept_balance", label, "top1pct_share"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _balance_plots(report: dict[str, Any], before: pa.Table | None, after: pa.Table | None) -> list[str]:
    if before is None or after is None:
        return []
    return [plot_rank(label_sizes(before, after, label), label) for label in report["before"]["concept_balance"]]


def _prevalence_section(report: dict[str, Any]) -> tuple[str, list[str]]:
    plots, body = [], ""
    for attr in report["before"]["representation"]:
        plots.append(plot_prevalence(report, attr))
        values = list(report["before"]["representation"][attr]["share"])
        rows = []
        for v in values:
            cells = [_e(v), num(report["before"]["representation"][attr]["target"][v], pointer("before", "representation", attr, "target", v))]
            for key, _, _ in _VIEWS:
                cells.append(num(report[key]["representation"][attr]["share"][v], pointer(key, "representation", attr, "share", v)))
            rows.append(cells)
        rb = [num(report[key]["representation"][attr]["rb"], pointer(key, "representation", attr, "rb")) for key, _, _ in _VIEWS]
        rows.append(["<b>RB</b>", ""] + rb)
        body += f"<h3>{_e(attr)}</h3>" + _table(["value", "target", "before", "after (E)", "after (repeats)"], rows)
    return body, plots


def _association_section(report: dict[str, Any]) -> tuple[str, list[str]]:
    body, firsts = "", []
    for i, assoc in enumerate(report["before"]["association"]):
        name = f'{assoc["attribute"]} x {assoc["label"]}'
        heat, hidden = plot_heatmaps(report, i)
        worst = plot_worst_pairs(report, i)
        if i == 0:
            firsts.append(worst)
        ab = " &rarr; ".join(num(report[k]["association"][i]["ab"], pointer(k, "association", i, "ab")) for k, _, _ in _VIEWS)
        tables = ""
        for key, _, title in _VIEWS[:2]:
            pairs = report[key]["association"][i]["worst_pairs"]
            tables += f"<div><h4>worst pairs {title}</h4>" + _table(
                ["value", "label", "gap"],
                [[_e(p["value"]), _e(p["label"]), num(p["gap"], pointer(key, "association", i, "worst_pairs", j, "gap"))] for j, p in enumerate(pairs)],
            ) + "</div>"
        note = f'<p class="muted">{hidden} labels with smaller gaps not drawn.</p>' if hidden else ""
        body += (f"<h3>{_e(name)}</h3><p>AB before &rarr; after (E) &rarr; after (repeats): {ab}</p>"
                 f'<div class="row"><div>{heat}{note}</div>{worst}</div><div class="row">{tables}</div>')
    return body, firsts


def _families_section(report: dict[str, Any]) -> str:
    """One row per M4 constraint family: how many constraints, how many bind, the worst moment
    before and after, and the attribute's leakage from that label set."""
    rows = []
    for i, fam in enumerate(report.get("constraint_families", [])):
        p = ("constraint_families", i)
        leak = fam.get("leakage")
        leak_cell = (f'{num(leak["before"]["accuracy"], pointer(*p, "leakage", "before", "accuracy"))} &rarr; '
                     f'{num(leak["after"]["accuracy"], pointer(*p, "leakage", "after", "accuracy"))}'
                     f'{_arrow(leak["before"]["accuracy"], leak["after"]["accuracy"])}') if leak else ""
        worst = fam["worst_moment"]
        rows.append([
            _e(fam["family"]), num(fam["step"], pointer(*p, "step")), num(fam["constraints"], pointer(*p, "constraints")),
            num(fam["tolerance"], pointer(*p, "tolerance")), num(fam["at_tolerance"], pointer(*p, "at_tolerance")),
            num(fam["over_tolerance"], pointer(*p, "over_tolerance")),
            num(worst["before"], pointer(*p, "worst_moment", "before")),
            num(worst["after_expected"], pointer(*p, "worst_moment", "after_expected")) + _arrow(worst["before"], worst["after_expected"]),
            num(worst["after_realized"], pointer(*p, "worst_moment", "after_realized")), leak_cell,
        ])
    return (_table(["family", "step", "constraints", "tolerance", "binding (at tolerance)", "over tolerance",
                    "worst |moment| before", "after (E)", "after (repeats)", "leakage from labels (accuracy)"], rows)
            + '<p class="muted">moment = sum_w (s_k - pi_k) y_r / W over rows carrying the attribute; per label: the '
              "worst |P_w(s = k | y = r) - pi_k| over label values (those under min_support pooled); embedding: "
              "|sum_w (s_k - pi_k) z_j| / (sd_j W) over principal components z_j; binding: at its "
              "tolerance under the final expected weights; leakage: a probe predicting the attribute from this label set "
              "(or embedding), before and after.</p>")


def _balance_section(report: dict[str, Any], plots: list[str]) -> str:
    body = ""
    keys = ("values", "entropy", "normalized_entropy", "gini", "top1pct_share", "largest", "smallest")
    for i, label in enumerate(report["before"]["concept_balance"]):
        rows = [[_e(k)] + [num(report[v]["concept_balance"][label][k], pointer(v, "concept_balance", label, k)) for v, _, _ in _VIEWS] for k in keys]
        plot = plots[i] if i < len(plots) else ""
        body += f"<h3>{_e(label)}</h3>" + '<div class="row">' + plot + _table(["metric", "before", "after (E)", "after (repeats)"], rows) + "</div>"
    return body


def _weights_section(report: dict[str, Any], hist: dict[str, Any]) -> str:
    w = report["weights"]
    rows = [[_e(k), num(v, pointer("weights", k))] for k, v in w.items()]
    checks = [
        ("manifest rows", hist["rows"], w["rows"]),
        ("sum of weights", hist["weight_sum"], w["expected_rows"]),
        ("sum of repeats", hist["repeat_sum"], w["realized_rows"]),
    ]
    crows = []
    for name, got, want in checks:
        ok = abs(got - want) <= 1e-6 * max(1.0, abs(want))
        crows.append([_e(name), num(got), num(want), '<span class="ok">ok</span>' if ok else '<span class="bad">MISMATCH</span>'])
    ess = hist["weight_sum"] ** 2 / hist["weight2_sum"] if hist["weight2_sum"] else 0.0
    return ('<div class="row">' + plot_histograms(hist) + "</div>" + '<div class="row"><div>' + _table(["", "value"], rows) + "</div><div>"
            + f'<h4>manifest read back ({hist["files"]} files)</h4>'
            + _table(["check", "manifest", "report.json", ""], crows)
            + f'<p class="muted">{num(hist["zero_weight_rows"])} rows have weight 0; ESS from the manifest: {num(ess)}</p></div></div>')


def _coverage_section(report: dict[str, Any]) -> str:
    """Per caption-sourced tag: share of captions tagged and the most frequent untagged nouns."""
    out = ""
    for name, cov in report["coverage"].items():
        ptr = pointer("coverage", name)
        nouns = [[_e(item["noun"]), num(item["count"], pointer_join(ptr, "untagged_nouns", i, "count"))]
                 for i, item in enumerate(cov["untagged_nouns"])]
        out += (f'<h3>{_e(name)}</h3><p>{num(cov["tagged"], pointer_join(ptr, "tagged"))} of '
                f'{num(cov["captions"], pointer_join(ptr, "captions"))} captions tagged '
                f'({num(cov["tagged_share"], pointer_join(ptr, "tagged_share"))}). Most frequent nouns of untagged captions '
                f'(what the vocabulary may miss; counts at most {num(cov["count_error_max"], pointer_join(ptr, "count_error_max"))} low):</p>'
                + (_table(["noun", "count"], nouns, "kv") if nouns else '<p class="muted">(none)</p>')
                + f'<p class="muted">{_e(cov["method"])}</p>')
    return out


def _rejects_section(report: dict[str, Any], store: RunStore) -> str:
    reasons = report["rows"]["rejected_by_reason"]
    if not reasons:
        return '<p class="muted">No rows were rejected.</p>'
    rows = [[_e(r), num(n, pointer("rows", "rejected_by_reason", r))] for r, n in reasons.items()]
    examples = reject_examples(store, list(reasons))
    ex_rows = [[_e(x.get("reason")), _e(x.get("stage")), _e(x.get("shard")), num(x.get("row")), _e(x.get("uid"))] for r, xs in examples.items() for x in xs]
    return ('<div class="row">' + plot_rejects(reasons) + _table(["reason", "rows"], rows) + "</div>"
            + "<h4>examples</h4>" + _table(["reason", "stage", "shard", "row", "uid"], ex_rows))


def _facts_section(report: dict[str, Any], run: dict[str, Any], stages: dict[str, Any]) -> str:
    import yaml

    rows = report["rows"]
    balanced = rows["input"] == rows["manifest"] + rows["rejected"]
    accounting = (f'<p>input {num(rows["input"], "/rows/input")} = manifest {num(rows["manifest"], "/rows/manifest")} + rejected '
                  f'{num(rows["rejected"], "/rows/rejected")} '
                  + ('<span class="ok">&#10003; reconciles</span>' if balanced else '<span class="bad">does NOT reconcile</span>') + "</p>")
    facts = [
        ["input", _e(report["input"]["uri"])],
        ["input fingerprint", f'<code>{_e(report["input"]["fingerprint"])}</code>'],
        ["shards", num(report["input"]["shards"], "/input/shards")],
        ["recipe fingerprint", f'<code>{_e(run.get("recipe_fingerprint", "?"))}</code>'],
        ["method", _e(report["method"])],
        ["seeds", _e(json.dumps(run.get("seeds", {})))],
        ["embedding dims", _e(json.dumps(run.get("embedding_dims", {})))],
    ]
    facts += [[_e(k), _e(v)] for k, v in run.get("versions", {}).items()]
    vocab = [[_e(k), num(v, pointer("vocabulary_sizes", k))] for k, v in report.get("vocabulary_sizes", {}).items()]
    secs = report.get("stage_seconds", {})
    timing_rows = []
    for name, s in secs.items():
        st = stages.get(name, {})
        per_unit, rate = st.get("seconds_per_unit", {}), st.get("rows_per_second_per_unit", {})
        slowest = ", ".join(f'{_e(u["unit"])} ({fmt(u["seconds"])} s)' for u in st.get("slowest", [])[:3])
        timing_rows.append([_e(name), num(s, pointer("stage_seconds", name)), num(st["units"]) if "units" in st else "",
                            num(st["task_seconds"]) if "task_seconds" in st else "",
                            num(per_unit["p50"]) if "p50" in per_unit else "", num(per_unit["p95"]) if "p95" in per_unit else "",
                            num(rate["p50"]) if "p50" in rate else "", f'<span class="muted">{slowest}</span>'])
    recipe = yaml.safe_dump(run.get("recipe", {}), sort_keys=False)
    return (accounting + '<div class="row"><div>' + _table(["fact", "value"], facts) + _table(["vocabulary", "values"], vocab)
            + "</div><div>" + (plot_timings(secs) if secs else "")
            + _table(["stage", "wall s", "units", "task s", "unit s p50", "unit s p95", "rows/s p50", "slowest units"], timing_rows)
            + "</div></div>"
            + f"<details><summary>recipe (resolved)</summary><pre>{_e(recipe)}</pre></details>")


def _read_optional_table(store: RunStore, *parts: str) -> pa.Table | None:
    return store.read_table(*parts) if store.exists(*parts) else None


def render_html(store: RunStore) -> str:
    if not store.exists("report.json"):
        raise InputError(f"{store.uri}: no report.json; the run has not finished (rerun it to resume)")
    report = store.read_json("report.json")
    run = store.read_json("run.json") if store.exists("run.json") else {}
    stages = store.read_json("stats", "stages.json") if store.exists("stats", "stages.json") else {}
    before = _read_optional_table(store, "signatures", "merged.parquet")
    after = _read_optional_table(store, "after", "merged.parquet")
    hist = manifest_histograms(store)

    prevalence, prev_plots = _prevalence_section(report)
    association, assoc_plots = _association_section(report)
    rank_plots = _balance_plots(report, before, after)
    sections = [
        ("prevalence", "Attribute prevalence vs targets", prevalence),
        ("association", "Associations (attributes x labels)", association),
        *([("families", "Constraint families (M4)", _families_section(report))] if report.get("constraint_families") else []),
        ("balance", "Concept balance", _balance_section(report, rank_plots)),
        ("weights", "Weights and repeats", _weights_section(report, hist)),
        ("solver", f'Solver diagnostics ({_e(report["method"])})', render_any(report.get("solution", {}), "/solution")),
    ]
    if "audit" in report:
        sections.append(("audit", "Tagging audit", render_any(report["audit"], "/audit")))
    if "coverage" in report:
        sections.append(("coverage", "Caption coverage", _coverage_section(report)))
    for key in sorted(k for k in report if k not in _KNOWN):
        sections.append((key, key.replace("_", " ").capitalize(), render_any(report[key], pointer(key))))
    sections += [
        ("rejects", "Rejects by reason", _rejects_section(report, store)),
        ("facts", "Run facts", _facts_section(report, run, stages)),
    ]
    glance = '<div class="glance">' + "".join(prev_plots[:1] + assoc_plots[:1] + rank_plots[:1]) + "</div>"
    nav = "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, t, _ in sections) + "</nav>"
    rows = report["rows"]
    sub = (f'{_e(report["method"])} &middot; input {_e(report["input"]["uri"])} ({num(report["input"]["shards"], "/input/shards")} shards, '
           f'fingerprint {_e(report["input"]["fingerprint"])}) &middot; out {_e(store.uri)} &middot; mmbalance {_e(run.get("versions", {}).get("mmbalance", "?"))}')
    body = "".join(f'<section id="{k}"><h2>{t}</h2>{b}</section>' for k, t, b in sections)
    legend = ('<p class="muted">after (E): expected weights; after (repeats): the realised resample. '
              'RB, AB, Gini, top-1% share: lower is more balanced; arrows compare after (E) with before.</p>')
    return html_page(f"mmbalance report: {_e(report['method'])}, {fmt(rows['input'])} rows", "mmbalance rebalance report", sub,
                     f'{_summary(report)}{legend}<section id="glance"><h2>At a glance</h2>{glance}</section>{nav}{body}')


def html_page(title: str, heading: str, sub: str, main: str) -> str:
    """The page around a report's sections (title, heading and sub line are HTML already)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f'<header><h1>{heading}</h1><div class="sub">{sub}</div></header><main>'
        f"{main}</main></body></html>\n"
    )


def write_html_report(out_dir: str) -> str:
    """Render OUT/report.html from the files of a finished run; returns its path."""
    store = RunStore(out_dir)
    page = render_html(store)
    with store.atomic_output("report.html") as stream:
        stream.write(page.encode("utf-8"))
    return store.path("report.html")
