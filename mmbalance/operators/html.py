"""The HTML both reports are made of (report.html and evaluate.html): one number formatter, JSON
pointers that tie every figure to its value in the run's JSON, generic rendering of diagnostics,
matplotlib figures as inline PNGs, cards, tables and the page around them."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np


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


def escape(text: Any) -> str:
    return html.escape(str(text))


def html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def render_any(obj: Any, ptr: str, depth: int = 0) -> str:
    """Generic rendering of diagnostics: scalars as key/value rows, dicts of numbers and lists of
    records as tables, anything else recursively. New solver or audit keys need no code here."""
    if isinstance(obj, dict):
        if not obj:
            return '<p class="muted">(empty)</p>'
        values = list(obj.values())
        if all(isinstance(v, dict) and v and all(is_number(x) or x is None for x in v.values()) for v in values):
            cols: list[str] = []
            for v in values:
                cols += [c for c in v if c not in cols]
            rows = [[escape(k)] + [num(v[c], pointer_join(ptr, k, c)) if c in v and v[c] is not None else "" for c in cols] for k, v in obj.items()]
            return html_table([""] + [escape(c) for c in cols], rows, "kv")
        scalars = [(k, v) for k, v in obj.items() if not isinstance(v, (dict, list))]
        nested = [(k, v) for k, v in obj.items() if isinstance(v, (dict, list))]
        out = ""
        if scalars:
            out += html_table(["key", "value"], [[escape(k), num(v, pointer_join(ptr, k)) if is_number(v) else escape(fmt(v))] for k, v in scalars], "kv")
        for k, v in nested:
            out += f'<div class="nested"><h4>{escape(k)}</h4>{render_any(v, pointer_join(ptr, k), depth + 1)}</div>'
        return out
    if isinstance(obj, list):
        if not obj:
            return '<p class="muted">(none)</p>'
        if all(isinstance(x, dict) and all(not isinstance(v, (dict, list)) for v in x.values()) for x in obj):
            cols = []
            for x in obj:
                cols += [c for c in x if c not in cols]
            rows = [[num(x[c], pointer_join(ptr, i, c)) if is_number(x.get(c)) else escape(fmt(x.get(c, ""))) for c in cols] for i, x in enumerate(obj)]
            return html_table([escape(c) for c in cols], rows, "kv")
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "<p>" + ", ".join(num(x, pointer_join(ptr, i)) if is_number(x) else escape(fmt(x)) for i, x in enumerate(obj)) + "</p>"
        return "".join(f'<div class="nested"><h4>[{i}]</h4>{render_any(x, pointer_join(ptr, i), depth + 1)}</div>' for i, x in enumerate(obj))
    return f"<p>{num(obj, ptr) if is_number(obj) else escape(fmt(obj))}</p>"


def pointer_join(ptr: str, *parts: Any) -> str:
    return ptr + pointer(*parts)


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100})
    return plt


def png(fig, alt: str) -> str:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def card(title: str, value: str, detail: str = "") -> str:
    return f'<div class="card"><div class="t">{escape(title)}</div><div class="v">{value}</div><div class="d">{detail}</div></div>'


CSS = """
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
"""


def html_page(title: str, heading: str, sub: str, main: str) -> str:
    """The page around a report's sections (title, heading and sub line are HTML already)."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{heading}</h1><div class="sub">{sub}</div></header><main>'
        f"{main}</main></body></html>\n"
    )
