"""report.html's figures (matplotlib, as inline PNGs) and the two bounded streaming passes over a
finished run it reads besides the small JSON files: the manifest's weight and repeat histograms
(batch by batch) and a few rejected rows per reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.io.store import RunStore
from mmbalance.operators.html import escape, png, pyplot
from mmbalance.schemas.contract import tag_column

HIST_BINS = 40
HEATMAP_MAX_LABELS = 40
REJECT_EXAMPLES = 5
VIEWS = (("before", "count", "before"), ("after_expected", "w_sum", "after (E)"), ("after_realized", "rep_sum", "after (repeats)"))
COLORS = {"before": "#9aa5b1", "after (E)": "#1f6feb", "after (repeats)": "#7ee2b8", "target": "#d73a49"}


def plot_prevalence(report: dict[str, Any], attr: str) -> str:
    plt = pyplot()
    rep = {name: report[key]["representation"][attr] for key, _, name in VIEWS}
    values = list(rep["before"]["share"])
    x = np.arange(len(values))
    width = 0.26
    fig, ax = plt.subplots(figsize=(max(3.4, 0.8 * len(values) + 1.6), 2.8))
    for i, (name, r) in enumerate(rep.items()):
        ax.bar(x + (i - 1) * width, [r["share"][v] for v in values], width, label=name, color=COLORS[name])
    target = rep["before"]["target"]
    for j, v in enumerate(values):
        ax.hlines(target[v], j - 1.6 * width, j + 1.6 * width, colors=COLORS["target"], linewidth=2, label="target" if j == 0 else None)
    ax.set_xticks(x, values, rotation=30 if len(values) > 6 else 0, ha="right" if len(values) > 6 else "center")
    top = max([target[v] for v in values] + [r["share"][v] for r in rep.values() for v in values] + [0.01])
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel(f"share of rows with {attr}")
    ax.set_title(f"{attr}: prevalence vs target")
    ax.legend(fontsize=7, frameon=False, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14 if len(values) <= 6 else -0.3))
    return png(fig, f"{attr} prevalence before and after against targets")


def plot_worst_pairs(report: dict[str, Any], index: int, top: int = 8) -> str:
    """Horizontal bars of the largest |gaps| before, next to the same pairs after."""
    plt = pyplot()
    before, after = report["before"]["association"][index], report["after_expected"]["association"][index]
    pairs: list[tuple[str, str]] = []
    binary = len(before["gaps"]) == 2  # the two rows mirror each other: one pair per label
    for p in before["worst_pairs"]:
        if len(pairs) < top and not (binary and any(r == p["label"] for _, r in pairs)):
            pairs.append((p["value"], p["label"]))
    y = np.arange(len(pairs))
    fig, ax = plt.subplots(figsize=(4.2, 0.28 * len(pairs) + 1.2))
    ax.barh(y + 0.2, [before["gaps"][v][r] for v, r in pairs], 0.4, color=COLORS["before"], label="before")
    ax.barh(y - 0.2, [after["gaps"][v][r] for v, r in pairs], 0.4, color=COLORS["after (E)"], label="after (E)")
    ax.set_yticks(y, [f"{v} | {r}" for v, r in pairs])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("E[label | value] - E[label | other values]")
    ax.set_title(f"worst {before['attribute']} x {before['label']} gaps")
    ax.legend(fontsize=7, frameon=False)
    return png(fig, "worst association gaps before and after")


def plot_heatmaps(report: dict[str, Any], index: int) -> tuple[str, int]:
    tables = [(name, report[key]["association"][index]["gaps"]) for key, _, name in VIEWS[:2]]
    values = list(tables[0][1])
    labels = list(next(iter(tables[0][1].values()), {}))
    if not labels:  # no labelled row (every row rejected): nothing to draw, and matplotlib would warn
        return '<p class="muted">no labelled rows to plot</p>', 0
    plt = pyplot()
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
    return png(fig, "association gap heatmaps before and after"), len(labels) - len(shown)


def label_sizes(before: pa.Table, after: pa.Table, label: str) -> dict[str, np.ndarray]:
    """Weight per label value, largest first, for each view (unlabeled rows excluded)."""
    col = tag_column(label)
    out = {}
    for (key, weight, name), table in zip(VIEWS, (before, after, after)):
        if col not in table.column_names or weight not in table.column_names:
            continue
        frame = pl.from_arrow(table.select([col, weight]))
        sizes = frame.filter(pl.col(col).is_not_null()).group_by(col).agg(pl.col(weight).sum())[weight].to_numpy().astype(float)
        out[name] = np.sort(sizes[sizes > 0])[::-1]
    return out


def plot_rank(sizes: dict[str, np.ndarray], label: str) -> str:
    if not any(len(s) for s in sizes.values()):
        return f'<p class="muted">{escape(label)}: no labelled rows to plot</p>'
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.0, 2.8))
    for name, s in sizes.items():
        if len(s):
            ax.loglog(np.arange(1, len(s) + 1), s, marker="o" if len(s) <= 60 else None, markersize=3, label=name, color=COLORS[name])
    ax.set_xlabel(f"rank of {label} value")
    ax.set_ylabel("rows (weight)")
    ax.set_title(f"{label}: size by rank (log-log)")
    ax.legend(fontsize=7, frameon=False)
    return png(fig, f"{label} size distribution by rank")


def plot_histograms(hist: dict[str, Any]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 2.6))
    edges, counts = hist["weight_edges"], hist["weight_counts"]
    axes[0].bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=COLORS["after (E)"])
    if np.any(np.asarray(counts) > 0):  # a log axis needs a positive bar (an all-rejected run has none)
        axes[0].set_yscale("log")
        axes[0].set_ylim(bottom=0.8)
    axes[0].set_xlabel("weight (expected repeats)")
    axes[0].set_ylabel("rows")
    axes[0].set_title("weights")
    reps = hist["repeat_counts"]
    axes[1].bar(np.arange(len(reps)), reps, color=COLORS["after (repeats)"])
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    if np.any(np.asarray(reps) > 0):
        axes[1].set_yscale("log")
        axes[1].set_ylim(bottom=0.8)
    axes[1].set_xlabel("repeats")
    axes[1].set_title("realised repeats")
    return png(fig, "histograms of weights and repeats")


def plot_timings(seconds: dict[str, float]) -> str:
    plt = pyplot()
    names = list(seconds)
    fig, ax = plt.subplots(figsize=(4.4, 0.25 * len(names) + 0.9))
    ax.barh(names, [seconds[n] for n in names], color="#6e7781")
    ax.invert_yaxis()
    ax.set_xlabel("seconds (wall)")
    return png(fig, "stage timings")


def plot_rejects(reasons: dict[str, int]) -> str:
    plt = pyplot()
    names = list(reasons)
    fig, ax = plt.subplots(figsize=(4.4, 0.25 * len(names) + 0.9))
    ax.barh(names, [reasons[n] for n in names], color=COLORS["target"])
    ax.invert_yaxis()
    ax.set_xlabel("rows rejected")
    return png(fig, "rejects by reason")


def manifest_histograms(store: RunStore, bins: int = HIST_BINS, batch_rows: int = 65536) -> dict[str, Any]:
    """Histogram of weights and of repeats, accumulated batch by batch (memory: one batch)."""
    files = store.list_files("manifest", suffix=".parquet")
    for name in files:  # read below by batches: each file checked against its done marker first
        store.verify("manifest", name)
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
    for stage in sorted(p for p in subdirs(store, "rejects")):
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


def subdirs(store: RunStore, *parts: str) -> list[str]:
    import pyarrow.fs as pafs

    base = store.path(*parts)
    if store.fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    return [f.base_name for f in store.fs.get_file_info(pafs.FileSelector(base)) if f.type == pafs.FileType.Directory]
