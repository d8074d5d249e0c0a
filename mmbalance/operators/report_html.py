"""OUT/report.html: one self-contained page (inline CSS, plots as base64 PNG) built from a finished run.

Inputs are the small files of the run (report.json, run.json, stats/stages.json, the merged signature
tables) plus two bounded streaming passes: the manifest, shard by shard, for the weight and repeat
histograms, and a few rows of rejects/ as examples. Every figure copied from report.json goes through
``num`` so it carries ``data-key`` (a JSON pointer into report.json) and is formatted by ``fmt``.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from mmbalance.io.store import RunStore
from mmbalance.operators.html import (card, escape, fmt, html_page, html_table, num, pointer, pointer_join, render_any,
                                      resolve)
from mmbalance.operators.report_plots import (VIEWS, label_sizes, manifest_histograms, plot_heatmaps, plot_histograms,
                                              plot_prevalence, plot_rank, plot_rejects, plot_timings, plot_worst_pairs,
                                              reject_examples)
from mmbalance.schemas.contract import InputError

# Known top-level keys of report.json; any other key gets a generic section so new stages show up.
_KNOWN = {
    "after_expected", "after_realized", "before", "input", "method", "rows", "solution",
    "stage_seconds", "vocabulary_sizes", "weights", "audit", "constraint_families", "coverage", "leakage",
}


# -- the page --------------------------------------------------------------------------------------

def _arrow(before: float, after: float, lower_is_better: bool = True) -> str:
    if abs(after - before) < 1e-12:
        return ""
    better = (after < before) == lower_is_better
    return f' <span class="{"good" if better else "bad"}">{"&#9660;" if after < before else "&#9650;"}</span>'


def _before_after_card(report: dict[str, Any], title: str, *path: Any, lower_is_better: bool = True) -> str:
    b, a, r = (resolve(report, pointer(view, *path)) for view in ("before", "after_expected", "after_realized"))
    return card(
        title,
        f'{num(b, pointer("before", *path))} &rarr; {num(a, pointer("after_expected", *path))}{_arrow(b, a, lower_is_better)}',
        f'before &rarr; after (E); repeats: {num(r, pointer("after_realized", *path))}',
    )


def _summary(report: dict[str, Any]) -> str:
    rows, w = report["rows"], report["weights"]
    cards = [
        card("input rows", num(rows["input"], "/rows/input"),
              f'{num(rows["manifest"], "/rows/manifest")} manifest + {num(rows["rejected"], "/rows/rejected")} rejected'),
        card("kept (expected)", num(w["expected_rows"], "/weights/expected_rows"),
              f'retention {num(w["retention"], "/weights/retention")}; realised {num(w["realized_rows"], "/weights/realized_rows")}'),
        card("effective sample size", num(w["ess"], "/weights/ess"),
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


def _prevalence_section(report: dict[str, Any]) -> str:
    body = ""
    for attr in report["before"]["representation"]:
        plot = plot_prevalence(report, attr)
        values = list(report["before"]["representation"][attr]["share"])
        rows = []
        for v in values:
            cells = [escape(v), num(report["before"]["representation"][attr]["target"][v], pointer("before", "representation", attr, "target", v))]
            for key, _, _ in VIEWS:
                cells.append(num(report[key]["representation"][attr]["share"][v], pointer(key, "representation", attr, "share", v)))
            rows.append(cells)
        rb = [num(report[key]["representation"][attr]["rb"], pointer(key, "representation", attr, "rb")) for key, _, _ in VIEWS]
        rows.append(["<b>RB</b>", ""] + rb)
        body += (f"<h3>{escape(attr)}</h3>" + f'<div class="row"><div>{plot}</div><div>'
                 + html_table(["value", "target", "before", "after (E)", "after (repeats)"], rows) + "</div></div>")
    return body


def _association_section(report: dict[str, Any]) -> str:
    body = ""
    for i, assoc in enumerate(report["before"]["association"]):
        name = f'{assoc["attribute"]} x {assoc["label"]}'
        heat, hidden = plot_heatmaps(report, i)
        worst = plot_worst_pairs(report, i)
        ab = " &rarr; ".join(num(report[k]["association"][i]["ab"], pointer(k, "association", i, "ab")) for k, _, _ in VIEWS)
        tables = ""
        for key, _, title in VIEWS[:2]:
            pairs = report[key]["association"][i]["worst_pairs"]
            tables += f"<div><h4>worst pairs {title}</h4>" + html_table(
                ["value", "label", "gap"],
                [[escape(p["value"]), escape(p["label"]), num(p["gap"], pointer(key, "association", i, "worst_pairs", j, "gap"))] for j, p in enumerate(pairs)],
            ) + "</div>"
        note = f'<p class="muted">{hidden} labels with smaller gaps not drawn.</p>' if hidden else ""
        body += (f"<h3>{escape(name)}</h3><p>AB before &rarr; after (E) &rarr; after (repeats): {ab}</p>"
                 f'<div class="row"><div>{heat}{note}</div>{worst}</div><div class="row">{tables}</div>')
    return body


def _families_section(report: dict[str, Any]) -> str:
    """One row per M4 constraint family: how many constraints, how many bind, the worst moment
    before and after, and the attribute's leakage from that label set."""
    rows = []
    for i, fam in enumerate(report.get("constraint_families", [])):
        p = ("constraint_families", i)
        leak = fam.get("leakage")
        leak_cell = (f'{_accuracy_cell(leak["before"], pointer(*p, "leakage", "before"))} &rarr; '
                     f'{_accuracy_cell(leak["after"], pointer(*p, "leakage", "after"))}'
                     f'{_arrow(leak["before"]["accuracy"], leak["after"]["accuracy"])}') if leak else ""
        worst = fam["worst_moment"]
        rows.append([
            escape(fam["family"]), num(fam["step"], pointer(*p, "step")), num(fam["constraints"], pointer(*p, "constraints")),
            num(fam["tolerance"], pointer(*p, "tolerance")), num(fam["at_tolerance"], pointer(*p, "at_tolerance")),
            num(fam["over_tolerance"], pointer(*p, "over_tolerance")),
            num(worst["before"], pointer(*p, "worst_moment", "before")),
            num(worst["after_expected"], pointer(*p, "worst_moment", "after_expected")) + _arrow(worst["before"], worst["after_expected"]),
            num(worst["after_realized"], pointer(*p, "worst_moment", "after_realized")), leak_cell,
        ])
    return (html_table(["family", "step", "constraints", "tolerance", "binding (at tolerance)", "over tolerance",
                    "worst |moment| before", "after (E)", "after (repeats)", "leakage from labels (accuracy)"], rows)
            + '<p class="muted">moment = sum_w (s_k - pi_k) y_r / W over rows carrying the attribute; per label: the '
              "worst |P_w(s = k | y = r) - pi_k| over label values (those under min_support pooled); embedding: "
              "|sum_w (s_k - pi_k) z_j| / (sd_j W) over principal components z_j; binding: at its "
              "tolerance under the final expected weights; leakage: a probe predicting the attribute from this label set "
              "(or embedding), before and after.</p>")


def _accuracy_cell(probe: dict[str, Any], ptr: str) -> str:
    """A probe accuracy with its interval (when the report has one)."""
    cell = num(probe["accuracy"], pointer_join(ptr, "accuracy"))
    ci = probe.get("accuracy_ci")
    if ci:
        cell += f' <span class="muted">[{num(ci[0], pointer_join(ptr, "accuracy_ci", 0))}, {num(ci[1], pointer_join(ptr, "accuracy_ci", 1))}]</span>'
    return cell


def _leakage_section(leakage: dict[str, Any]) -> str:
    """One row per attribute and feature set: accuracy with its interval against the majority rate,
    before and after, the excess, and how many rows scored it (flagged when too few to read)."""
    rows = []
    for attr, probes in leakage.items():
        if not isinstance(probes, dict):
            continue
        for feature, views in probes.items():
            p = ("leakage", attr, feature)
            cells = [escape(attr), escape(feature.replace("_", " "))]
            for view in ("before", "after"):
                probe = views.get(view)
                if not probe:
                    cells += ['<span class="muted">too few rows to probe</span>', "", "", ""]
                    continue
                q = pointer(*p, view)
                excess = num(probe["excess"], pointer_join(q, "excess"))
                if probe.get("excess_ci"):
                    excess += f' <span class="muted">[{num(probe["excess_ci"][0], pointer_join(q, "excess_ci", 0))}, {num(probe["excess_ci"][1], pointer_join(q, "excess_ci", 1))}]</span>'
                scored = num(probe["test_rows"], pointer_join(q, "test_rows"))
                if "effective_test_rows" in probe:
                    scored += (f' ({probe.get("scoring", "held_out").replace("_", " ")}, effective '
                               f'{num(probe["effective_test_rows"], pointer_join(q, "effective_test_rows"))})')
                    if not probe.get("readable", True):
                        scored += ' <span class="bad">too few to read</span>'
                cells += [_accuracy_cell(probe, q), num(probe["majority_rate"], pointer_join(q, "majority_rate")), excess, scored]
            rows.append(cells)
    conf = next((v.get("confidence") for probes in leakage.values() if isinstance(probes, dict)
                 for views in probes.values() for v in views.values() if v and v.get("confidence")), None)
    note = (f"{int(round(100 * conf))}% intervals over the scored rows (docs/algorithms.md). " if conf else "") + (
        "A probe predicts the attribute from the labels (dataset) or an embedding, fit with the weights of each view; "
        "excess = accuracy - weighted majority rate (0: nothing to learn). One uid-hash fifth is held out while it "
        "holds enough rows, otherwise every fifth is scored out of fold (cross fit).")
    return (html_table(["attribute", "from", "before: accuracy", "majority", "excess", "scored rows",
                    "after: accuracy", "majority", "excess", "scored rows"], rows)
            + f'<p class="muted">{note}</p>')


def _balance_section(report: dict[str, Any], plots: list[str]) -> str:
    body = ""
    keys = ("values", "entropy", "normalized_entropy", "gini", "top1pct_share", "largest", "smallest")
    for i, label in enumerate(report["before"]["concept_balance"]):
        rows = [[escape(k)] + [num(report[v]["concept_balance"][label][k], pointer(v, "concept_balance", label, k)) for v, _, _ in VIEWS] for k in keys]
        plot = plots[i] if i < len(plots) else ""
        body += f"<h3>{escape(label)}</h3>" + '<div class="row">' + plot + html_table(["metric", "before", "after (E)", "after (repeats)"], rows) + "</div>"
    return body


def _weights_section(report: dict[str, Any], hist: dict[str, Any]) -> str:
    w = report["weights"]
    rows = [[escape(k), num(v, pointer("weights", k))] for k, v in w.items()]
    checks = [
        ("manifest rows", hist["rows"], w["rows"]),
        ("sum of weights", hist["weight_sum"], w["expected_rows"]),
        ("sum of repeats", hist["repeat_sum"], w["realized_rows"]),
    ]
    crows = []
    for name, got, want in checks:
        ok = abs(got - want) <= 1e-6 * max(1.0, abs(want))
        crows.append([escape(name), num(got), num(want), '<span class="ok">ok</span>' if ok else '<span class="bad">MISMATCH</span>'])
    ess = hist["weight_sum"] ** 2 / hist["weight2_sum"] if hist["weight2_sum"] else 0.0
    return ('<div class="row">' + plot_histograms(hist) + "</div>" + '<div class="row"><div>' + html_table(["", "value"], rows) + "</div><div>"
            + f'<h4>manifest read back ({hist["files"]} files)</h4>'
            + html_table(["check", "manifest", "report.json", ""], crows)
            + f'<p class="muted">{num(hist["zero_weight_rows"])} rows have weight 0; ESS from the manifest: {num(ess)}</p></div></div>')


def _coverage_section(report: dict[str, Any]) -> str:
    """Per caption-sourced tag: share of captions tagged and the most frequent untagged nouns."""
    out = ""
    for name, cov in report["coverage"].items():
        ptr = pointer("coverage", name)
        nouns = [[escape(item["noun"]), num(item["count"], pointer_join(ptr, "untagged_nouns", i, "count"))]
                 for i, item in enumerate(cov["untagged_nouns"])]
        out += (f'<h3>{escape(name)}</h3><p>{num(cov["tagged"], pointer_join(ptr, "tagged"))} of '
                f'{num(cov["captions"], pointer_join(ptr, "captions"))} captions tagged '
                f'({num(cov["tagged_share"], pointer_join(ptr, "tagged_share"))}). Most frequent nouns of untagged captions '
                f'(what the vocabulary may miss; counts at most {num(cov["count_error_max"], pointer_join(ptr, "count_error_max"))} low):</p>'
                + (html_table(["noun", "count"], nouns, "kv") if nouns else '<p class="muted">(none)</p>')
                + f'<p class="muted">{escape(cov["method"])}</p>')
    return out


def _rejects_section(report: dict[str, Any], store: RunStore) -> str:
    reasons = report["rows"]["rejected_by_reason"]
    if not reasons:
        return '<p class="muted">No rows were rejected.</p>'
    rows = [[escape(r), num(n, pointer("rows", "rejected_by_reason", r))] for r, n in reasons.items()]
    examples = reject_examples(store, list(reasons))
    ex_rows = [[escape(x.get("reason")), escape(x.get("stage")), escape(x.get("shard")), num(x.get("row")), escape(x.get("uid"))] for r, xs in examples.items() for x in xs]
    return ('<div class="row">' + plot_rejects(reasons) + html_table(["reason", "rows"], rows) + "</div>"
            + "<h4>examples</h4>" + html_table(["reason", "stage", "shard", "row", "uid"], ex_rows))


def _facts_section(report: dict[str, Any], run: dict[str, Any], stages: dict[str, Any]) -> str:
    import yaml

    rows = report["rows"]
    balanced = rows["input"] == rows["manifest"] + rows["rejected"]
    accounting = (f'<p>input {num(rows["input"], "/rows/input")} = manifest {num(rows["manifest"], "/rows/manifest")} + rejected '
                  f'{num(rows["rejected"], "/rows/rejected")} '
                  + ('<span class="ok">&#10003; reconciles</span>' if balanced else '<span class="bad">does NOT reconcile</span>') + "</p>")
    facts = [
        ["input", escape(report["input"]["uri"])],
        ["input fingerprint", f'<code>{escape(report["input"]["fingerprint"])}</code>'],
        ["shards", num(report["input"]["shards"], "/input/shards")],
        ["recipe fingerprint", f'<code>{escape(run.get("recipe_fingerprint", "?"))}</code>'],
        ["method", escape(report["method"])],
        ["seeds", escape(json.dumps(run.get("seeds", {})))],
        ["embedding dims", escape(json.dumps(run.get("embedding_dims", {})))],
    ]
    facts += [[escape(k), escape(v)] for k, v in run.get("versions", {}).items()]
    vocab = [[escape(k), num(v, pointer("vocabulary_sizes", k))] for k, v in report.get("vocabulary_sizes", {}).items()]
    secs = report.get("stage_seconds", {})
    timing_rows = []
    for name, s in secs.items():
        st = stages.get(name, {})
        per_unit, rate = st.get("seconds_per_unit", {}), st.get("rows_per_second_per_unit", {})
        slowest = ", ".join(f'{escape(u["unit"])} ({fmt(u["seconds"])} s)' for u in st.get("slowest", [])[:3])
        timing_rows.append([escape(name), num(s, pointer("stage_seconds", name)), num(st["units"]) if "units" in st else "",
                            num(st["task_seconds"]) if "task_seconds" in st else "",
                            num(per_unit["p50"]) if "p50" in per_unit else "", num(per_unit["p95"]) if "p95" in per_unit else "",
                            num(rate["p50"]) if "p50" in rate else "", f'<span class="muted">{slowest}</span>'])
    recipe = yaml.safe_dump(run.get("recipe", {}), sort_keys=False)
    return (accounting + '<div class="row"><div>' + html_table(["fact", "value"], facts) + html_table(["vocabulary", "values"], vocab)
            + "</div><div>" + (plot_timings(secs) if secs else "")
            + html_table(["stage", "wall s", "units", "task s", "unit s p50", "unit s p95", "rows/s p50", "slowest units"], timing_rows)
            + "</div></div>"
            + f"<details><summary>recipe (resolved)</summary><pre>{escape(recipe)}</pre></details>")


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

    prevalence = _prevalence_section(report)
    association = _association_section(report)
    rank_plots = _balance_plots(report, before, after)
    sections = [
        ("prevalence", "Attribute prevalence vs targets", prevalence),
        ("association", "Associations (attributes x labels)", association),
        *([("families", "Constraint families (M4)", _families_section(report))] if report.get("constraint_families") else []),
        ("balance", "Concept balance", _balance_section(report, rank_plots)),
        ("weights", "Weights and repeats", _weights_section(report, hist)),
        ("solver", f'Solver diagnostics ({escape(report["method"])})', render_any(report.get("solution", {}), "/solution")),
    ]
    if "audit" in report:
        sections.append(("audit", "Tagging audit", render_any(report["audit"], "/audit")))
    if "coverage" in report:
        sections.append(("coverage", "Caption coverage", _coverage_section(report)))
    if isinstance(report.get("leakage"), dict) and any(isinstance(v, dict) for v in report["leakage"].values()):
        sections.append(("leakage", "Leakage probes", _leakage_section(report["leakage"])))
    elif "leakage" in report:
        sections.append(("leakage", "Leakage", render_any(report["leakage"], pointer("leakage"))))
    for key in sorted(k for k in report if k not in _KNOWN):
        sections.append((key, key.replace("_", " ").capitalize(), render_any(report[key], pointer(key))))
    sections += [
        ("rejects", "Rejects by reason", _rejects_section(report, store)),
        ("facts", "Run facts", _facts_section(report, run, stages)),
    ]
    nav = "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, t, _ in sections) + "</nav>"
    rows = report["rows"]
    sub = (f'{escape(report["method"])} &middot; input {escape(report["input"]["uri"])} ({num(report["input"]["shards"], "/input/shards")} shards, '
           f'fingerprint {escape(report["input"]["fingerprint"])}) &middot; out {escape(store.uri)} &middot; mmbalance {escape(run.get("versions", {}).get("mmbalance", "?"))}')
    body = "".join(f'<section id="{k}"><h2>{t}</h2>{b}</section>' for k, t, b in sections)
    legend = ('<p class="muted">after (E): expected weights; after (repeats): the realised resample. '
              'RB, AB, Gini, top-1% share: lower is more balanced; arrows compare after (E) with before.</p>')
    return html_page(f"mmbalance report: {escape(report['method'])}, {fmt(rows['input'])} rows", "mmbalance rebalance report", sub,
                     f'{_summary(report)}{legend}{nav}{body}')


def write_html_report(out_dir: str) -> str:
    """Render OUT/report.html from the files of a finished run; returns its path (a URI with its scheme)."""
    store = RunStore(out_dir)
    page = render_html(store)
    with store.atomic_output("report.html") as stream:
        stream.write(page.encode("utf-8"))
    return store.uri_of("report.html")
