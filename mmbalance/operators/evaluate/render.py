"""evaluate.json as a terminal table (rich; fits 80 columns, cells never wrap) and as
evaluate.html in the style of report.html (its page, CSS, formatter and plot helpers)."""

from __future__ import annotations

import numpy as np

from mmbalance.operators.evaluate.figures import get_path
from mmbalance.operators.report_html import _card, _e, _plt, _png, _table, html_page, num, pointer, render_any

ARROW = "->"


def main_rows(doc: dict) -> list[tuple[str, str, tuple]]:
    """(section, figure name, key) of the headline figures, in display order."""
    rows: list[tuple[str, str, tuple]] = []
    for name in doc.get("labels") or {}:
        rows.append((f"label {name}", "zero-shot accuracy", ("labels", name, "accuracy")))
    for name, attr in (doc.get("attributes") or {}).items():
        section = f"attribute {name}"
        rows.append((section, "accuracy on cued images", ("attributes", name, "accuracy")))
        for value in attr["values"]:
            rows.append((section, f"share {value} (neutral)", ("attributes", name, "share", value)))
        rows.append((section, "RB", ("attributes", name, "rb")))
        for label in attr.get("ab") or {}:
            rows.append((section, f"AB x {label}", ("attributes", name, "ab", label)))
        for label, ret in (attr.get("retrieval") or {}).items():
            for k in ret.get("k", []):
                rows.append((section, f"MaxSkew@{k} x {label}", ("attributes", name, "retrieval", label, "max_skew", str(k))))
            rows.append((section, f"NDKL x {label}", ("attributes", name, "retrieval", label, "ndkl")))
    for direction, figures in ((doc.get("retrieval") or {}).items()):
        if isinstance(figures, dict):
            for k in figures:
                rows.append(("retrieval", f"{direction.replace('_to_', ARROW)} {k}", ("retrieval", direction, k)))
    return rows


def _note(doc: dict, key: tuple) -> str:
    if key[0] == "labels":
        return f"chance {doc['labels'][key[1]]['chance']:.3f}"
    attr = doc["attributes"][key[1]] if key[0] == "attributes" else None
    if attr is None:
        return f"n={doc['retrieval']['pairs']:,}"
    if key[2] == "share":
        return f"target {attr['target'][key[3]]:.3f}"
    if key[2] == "accuracy":
        return f"n={attr['images']['cued']:,}"
    if key[2] == "rb":
        return f"n={attr['images']['neutral']:,}"
    if key[2] == "ab":
        worst = attr["ab"][key[3]].get("worst_label")
        return f"worst {worst}" if worst else ""
    if key[2] == "retrieval":
        return f"pool {attr['retrieval'][key[3]]['pool']['images']:,}"
    return ""


def fmt3(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def fmt_ci(ci: list | None, signed: bool = False) -> str:
    return "" if not ci else f"[{fmt3(ci[0], signed)}, {fmt3(ci[1], signed)}]"


def _terminal_table(title: str, columns: list[tuple[str, str]]):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
    for i, (header, justify) in enumerate(columns):
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis", max_width=30 if i == 0 else 18)
    return table


def _sections(table, rows, cells) -> None:
    current = None
    for section, name, key in rows:
        if section != current:
            if current is not None:
                table.add_section()
            table.add_row(f"[bold]{section}[/bold]")
            current = section
        table.add_row(f"  {name}", *cells(key))


def print_evaluation(doc: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    ev, model = doc["eval"], doc["model"]
    confidence = doc["settings"]["bootstrap"]["confidence"]
    console.print(f"[bold]mmbalance evaluate[/bold] {model['model']} {model.get('pretrained') or ''}", soft_wrap=True)
    console.print(f"{ev['images']:,} images of {ev['rows']:,} rows ({ev['rejected']:,} rejected), {model['scoring']} scoring",
                  soft_wrap=True)
    for reason, count in ev["rejected_by_reason"].items():
        console.print(f"  rejected: {count:,} x {reason}", soft_wrap=True)
    table = _terminal_table("", [("figure", "left"), ("value", "right"), (f"{confidence:.0%} interval", "right"), ("", "left")])

    def cells(key):
        fig = get_path(doc, key) or {}
        return fmt3(fig.get("value")), fmt_ci(fig.get("ci")), _note(doc, key)

    _sections(table, main_rows(doc), cells)
    console.print(table)


def print_comparison(doc: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    base = doc["baseline"]
    base_doc = doc["models"][base]["result"]
    confidence = base_doc["settings"]["bootstrap"]["confidence"]
    console.print(f"[bold]mmbalance evaluate --compare[/bold]: {len(doc['models'])} checkpoints on "
                  f"{base_doc['eval']['images']:,} images; differences against {base}", soft_wrap=True)
    for name, diff in doc["differences"].items():
        other = doc["models"][name]["result"]
        table = _terminal_table(f"{name} vs {base}", [("figure", "left"), (base[:10], "right"), (name[:10], "right"),
                                                       ("diff", "right"), (f"{confidence:.0%} interval", "right")])

        def cells(key, other=other, diff=diff):
            a, b, d = (get_path(x, key) or {} for x in (base_doc, other, diff))
            return fmt3(a.get("value")), fmt3(b.get("value")), fmt3(d.get("value"), True), fmt_ci(d.get("ci"), True)

        _sections(table, main_rows(base_doc), cells)
        console.print(table)


# -- HTML ------------------------------------------------------------------------------------------


def _fig_html(doc: dict, key: tuple, prefix: tuple = ()) -> str:
    fig = get_path(doc, key) or {}
    value, ci = fig.get("value"), fig.get("ci")
    ptr = pointer(*prefix, *key)
    out = num(value, pointer(*prefix, *key, "value")) if value is not None else "n/a"
    if ci:
        out += f' <span class="muted">[{num(ci[0], ptr + "/ci/0")}, {num(ci[1], ptr + "/ci/1")}]</span>'
    return out


def _errorbar_plot(title: str, names: list[str], figs: list[dict], ylabel: str, reference: dict[str, float] | None = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.6, 0.5 * len(names) + 1.6), 2.6))
    x = np.arange(len(names))
    vals = np.array([f.get("value") if f.get("value") is not None else np.nan for f in figs], float)
    lo = np.array([f["ci"][0] if f.get("ci") else v for f, v in zip(figs, vals)], float)
    hi = np.array([f["ci"][1] if f.get("ci") else v for f, v in zip(figs, vals)], float)
    ax.errorbar(x, vals, yerr=[vals - lo, hi - vals], fmt="o", color="#1f6feb", capsize=3)
    for j, name in enumerate(names):
        if reference and name in reference:
            ax.hlines(reference[name], j - 0.3, j + 0.3, colors="#d73a49", linewidth=2)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig, title)


def _attribute_section(doc: dict, name: str, prefix: tuple = ()) -> str:
    attr = doc["attributes"][name]
    base = ("attributes", name)
    values = attr["values"]
    rows = [[_e(v), num(attr["target"][v]), _fig_html(doc, base + ("share", v), prefix)] for v in values]
    plot = _errorbar_plot(f"{name}: predicted share, neutral images", values,
                          [get_path(doc, base + ("share", v)) or {} for v in values], "share", attr["target"])
    cond = f" (prompts filled with the image's {_e(attr['condition'])})" if attr.get("condition") else ""
    body = (f'<p class="muted">{attr["images"]["neutral"]:,} neutral images, {attr["images"]["cued"]:,} cued{cond}; '
            f'RB {_fig_html(doc, base + ("rb",), prefix)}; accuracy on cued images {_fig_html(doc, base + ("accuracy",), prefix)}</p>'
            + '<div class="row">' + plot + _table(["value", "target", "predicted share"], rows) + "</div>")
    for label, ab in (attr.get("ab") or {}).items():
        key = base + ("ab", label)
        labels = list(ab["by_label"])
        rows = [[_e(j), f'{ab["by_label"][j]["images"]:,}'] + [_fig_html(doc, key + ("by_label", j, "share", v), prefix) for v in values]
                + [_fig_html(doc, key + ("by_label", j, "gap"), prefix)] for j in labels]
        rows.append(["<b>all</b>", f'{ab["images"]:,}'] + [_fig_html(doc, key + ("overall_share", v), prefix) for v in values] + [""])
        plot = _errorbar_plot(f"{name} share {values[0]} by {label}", labels,
                              [get_path(doc, key + ("by_label", j, "share", values[0])) or {} for j in labels], f"share {values[0]}",
                              {j: (get_path(doc, key + ("overall_share", values[0], "value")) or 0.0) for j in labels}) if labels else ""
        body += (f"<h3>AB x {_e(label)}: {_fig_html(doc, key, prefix)} (worst: {_e(ab.get('worst_label'))})</h3>"
                 + '<div class="row">' + plot + _table([_e(label), "images", *[f"share {_e(v)}" for v in values], "gap"], rows) + "</div>")
    for label, ret in (attr.get("retrieval") or {}).items():
        key = base + ("retrieval", label)
        ks = ret.get("k", [])
        rows = [[_e(q)] + [_fig_html(doc, key + ("by_query", q, "max_skew", str(k)), prefix) for k in ks]
                + [_fig_html(doc, key + ("by_query", q, "ndkl"), prefix)] for q in (ret.get("by_query") or {})]
        rows.append(["<b>mean</b>"] + [_fig_html(doc, key + ("max_skew", str(k)), prefix) for k in ks] + [_fig_html(doc, key + ("ndkl",), prefix)])
        rows.append(["<b>worst</b>"] + [_fig_html(doc, key + ("max_skew_worst", str(k)), prefix) for k in ks]
                    + [_fig_html(doc, key + ("ndkl_worst",), prefix)])
        skipped = f'; k skipped (pool too small): {ret["k_skipped"]}' if ret.get("k_skipped") else ""
        body += (f"<h3>Retrieval skew x {_e(label)}</h3><p class=\"muted\">text queries of each {_e(label)} rank a pool of "
                 f'{ret["pool"]["images"]:,} cued images, {ret["pool"]["per_value"]:,} per value{skipped}</p>'
                 + _table(["query", *[f"MaxSkew@{k}" for k in ks], "NDKL"], rows))
    return body


def _label_section(doc: dict, name: str, prefix: tuple = ()) -> str:
    lab = doc["labels"][name]
    rows = [[_e(v), f'{lab["by_value"][v]["images"]:,}', _fig_html(doc, ("labels", name, "by_value", v, "accuracy"), prefix)]
            for v in lab["by_value"]]
    return (f'<p>zero-shot accuracy {_fig_html(doc, ("labels", name, "accuracy"), prefix)} on {lab["images"]:,} images '
            f'(chance {num(lab["chance"])})</p>' + _table(["value", "images", "accuracy"], rows))


def evaluation_html(doc: dict) -> str:
    model, ev = doc["model"], doc["eval"]
    cards = [_card(f"{n} accuracy", _fig_html(doc, ("labels", n, "accuracy")), f'chance {num(lab["chance"])}')
             for n, lab in doc["labels"].items()]
    for n, attr in doc["attributes"].items():
        cards.append(_card(f"{n} RB", _fig_html(doc, ("attributes", n, "rb")), "max |share - target|, neutral images"))
        for label in attr.get("ab") or {}:
            cards.append(_card(f"{n} AB x {label}", _fig_html(doc, ("attributes", n, "ab", label)), "max |share(label) - share|"))
        for label, ret in (attr.get("retrieval") or {}).items():
            key = ("attributes", n, "retrieval", label)
            cards += [_card(f"{n} MaxSkew@{k} x {label}", _fig_html(doc, key + ("max_skew", str(k))), "mean over queries")
                      for k in ret.get("k", [])[:1]]
            cards.append(_card(f"{n} NDKL x {label}", _fig_html(doc, key + ("ndkl",)), "mean over queries"))
    sections = [(f"attr-{n}", f"Attribute {_e(n)}", _attribute_section(doc, n)) for n in doc["attributes"]]
    sections += [(f"label-{n}", f"Label {_e(n)}", _label_section(doc, n)) for n in doc["labels"]]
    if doc.get("retrieval"):
        rows = [[_e(d.replace("_to_", " -> "))] + [_fig_html(doc, ("retrieval", d, k)) for k in figs]
                for d, figs in doc["retrieval"].items() if isinstance(figs, dict)]
        ks = list(next(f for f in doc["retrieval"].values() if isinstance(f, dict)))
        sections.append(("retrieval", "Image-text retrieval", f'<p>{doc["retrieval"]["pairs"]:,} image-caption pairs</p>'
                         + _table(["direction", *ks], rows)))
    sections.append(("set", "Evaluation set", render_any(ev, "/eval")))
    sections.append(("model", "Model", render_any(model, "/model")))
    nav = "<nav>" + "".join(f'<a href="#{k}">{t}</a>' for k, t, _ in sections) + "</nav>"
    body = "".join(f'<section id="{k}"><h2>{t}</h2>{b}</section>' for k, t, b in sections)
    confidence = doc["settings"]["bootstrap"]["confidence"]
    legend = (f'<p class="muted">Brackets: {confidence:.0%} bootstrap intervals ({doc["settings"]["bootstrap"]["samples"]:,} '
              "resamples of the images). RB, AB, MaxSkew, NDKL: lower is less biased; a bias figure from a model whose "
              "label accuracy is near chance says little.</p>")
    weights = model.get("checkpoint_sha256") or model.get("weights_sha256") or ""
    sub = (f'{_e(model["model"])} {_e(model.get("pretrained") or "")} {_e(weights[:12])} &middot; {_e(model["scoring"])} &middot; '
           f'{_e(ev["path"])}: {ev["images"]:,} images of {ev["rows"]:,} rows')
    return html_page(f"mmbalance evaluation: {_e(model['model'])}", "mmbalance evaluation", sub,
                     '<div class="cards">' + "".join(cards) + "</div>" + legend + nav + body)


def comparison_html(doc: dict) -> str:
    names = list(doc["models"])
    base = doc["baseline"]
    base_doc = doc["models"][base]["result"]
    header = ["figure", *[f'<a href="{_e(doc["models"][n]["dir"])}/evaluate.html">{_e(n)}</a>' for n in names],
              *[f"{_e(n)} - {_e(base)}" for n in names[1:]]]
    rows, plots = [], []
    for section, name, key in main_rows(base_doc):
        cells = [_fig_html(doc["models"][n]["result"], key, ("models", n, "result")) for n in names]
        cells += [_fig_html(doc["differences"][n], key, ("differences", n)) for n in names[1:]]
        rows.append([f"{_e(section)}: {_e(name)}", *cells])
        if key[-1] in ("rb", "accuracy") or key[2:3] == ("ab",):
            plots.append(_errorbar_plot(f"{section}: {name}", names, [get_path(doc["models"][n]["result"], key) or {} for n in names], name))
    sub = f'{len(names)} checkpoints on {base_doc["eval"]["images"]:,} images of {_e(base_doc["eval"]["path"])}; baseline {_e(base)}'
    legend = ('<p class="muted">Differences are against the baseline; their intervals come from paired bootstrap resamples '
              "(the same images drawn for every checkpoint).</p>")
    return html_page("mmbalance evaluation: comparison", "mmbalance evaluation: comparison", sub,
                     legend + '<section id="glance"><h2>At a glance</h2><div class="glance">' + "".join(plots[:9])
                     + '</div></section><section id="figures"><h2>Figures</h2>' + _table(header, rows) + "</section>")


def _write(store, name: str, page: str) -> str:
    with store.atomic_output(name) as stream:
        stream.write(page.encode("utf-8"))
    return store.path(name)


def write_html(store, doc: dict) -> str:
    return _write(store, "evaluate.html", evaluation_html(doc))


def write_compare_html(store, doc: dict) -> str:
    return _write(store, "evaluate.html", comparison_html(doc))
