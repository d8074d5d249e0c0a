"""Terminal summaries (rich tables) of a run report and of a validation.

On a terminal rich lays lines and tables out for its width. Anywhere else (a pipe, a log file, CI)
a line is never wrapped and tables are laid out for ``COLUMNS`` (80 when unset); every table here
stays legible at 80 columns: no vertical rules, figures never wrap, names wrap at word boundaries.
"""

from __future__ import annotations

import posixpath
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, soft_wrap=True)


def make_table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A compact table; ``columns`` are (header, "left" | "right"); right-aligned ones are figures."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for header, justify in columns:
        if justify == "right":
            table.add_column(header, justify="right", no_wrap=True)
        else:
            table.add_column(header, overflow="fold")
    return table


def join_uri(base: str, *parts: str) -> str:
    """A path or URI under ``base`` with one separator (``run/`` + ``report.html`` is ``run/report.html``)."""
    scheme, sep, rest = base.partition("://")
    if not sep:
        scheme, rest = "", base
    rest = rest.rstrip("/") or ("/" if rest.startswith("/") else "")
    joined = posixpath.join(rest, *parts)
    return f"{scheme}://{joined}" if sep else joined


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def count_text(x: float) -> str:
    """A row count or a sum of weights: integral values without decimals."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def describe_recipe(recipe) -> list[str]:
    """The recipe in plain words: what is tagged, clustered and balanced, step by step."""
    lines = []
    for attr in recipe.attributes:
        lines.append(f"attribute {attr.name} ({', '.join(attr.values)}) from {' + '.join(attr.sources)}")
    for label in recipe.labels:
        lines.append(f"label {label.name} from {' + '.join(label.sources)}")
    for cluster in recipe.clusters:
        lines.append(f"label {cluster.name}: {cluster.k} k-means clusters of the {cluster.embedding} embeddings")
    for i, step in enumerate(recipe.balance_steps(), 1):
        text = _describe_step(step)
        if i > 1:  # a later step's retention is a share of what the earlier ones keep
            text = text.replace("% of rows", "% of the rows the earlier steps keep")
        lines.append(f"step {i}: " + text)
    return lines


def _describe_step(step) -> str:
    if step.method == "none":
        return "none (every valid row kept once)"
    if step.method == "cap":
        return f"cap: each {step.by} value kept at about {step.cap:,} rows (MetaCLIP); does not hold attribute shares"
    if step.method == "m4":
        parts = []
        for attr, shares in step.targets.items():
            parts.append(f"{attr} shares " + "/".join(f"{v} {p:g}" for v, p in shares.items())
                         + f" within {step.tolerance.representation:g}")
        labels = [(a, y) for a, y in step.associate if not y.startswith("embedding.")]
        embeddings = [(a, y) for a, y in step.associate if y.startswith("embedding.")]
        tol = step.tolerance
        if labels and tol.association is not None:
            parts.append(f"no {', '.join(f'{a} x {y}' for a, y in labels)} association beyond {tol.association:g} of the weight")
        if labels and tol.association_per_label is not None:
            parts.append("within each " + ", ".join(dict.fromkeys(y for _, y in labels)) + " value, "
                         + "/".join(dict.fromkeys(a for a, _ in labels)) + f" shares within {tol.association_per_label:g} of the target")
        for a, y in embeddings:
            parts.append(f"equal mean {y.split('.', 1)[1]} embeddings across {a} values (top {step.embedding_components} "
                         f"principal components, within {tol.association_embedding:g} sd)")
        return f"m4 moment matching: {'; '.join(parts)}; keeping about {step.retention:.0%} of rows"
    if step.method == "waterfill":
        size = f"{step.size:,} rows" if step.size is not None else f"{step.retention:.0%} of rows"
        return f"waterfill: max-min fair quotas over {step.by} to {size}"
    if step.method == "reweigh":
        return f"reweigh: {step.attribute} and {step.label} made independent (Kamiran-Calders)"
    if step.method == "rake":
        return "rake: weights scaled until the target shares hold"
    if step.method == "rnb":
        return f"rnb: R&B domain mixture over {step.by}"
    return step.method


# figures that fall as a corpus gets more balanced, and what to do when a run raised one
_HOLDS_SHARES = {"m4", "rake"}


def regression_lines(report: dict[str, Any], recipe=None) -> list[str]:
    """Plain warnings when the run made a bias figure worse than the input, with what to change."""
    b, a = report["before"], report["after_expected"]
    methods = [s.method for s in recipe.balance_steps()] if recipe is not None else report.get("method", "").split("+")
    m4 = [s for s in recipe.balance_steps() if s.method == "m4"] if recipe is not None else []
    lines = []
    slack = 1e-4  # solver tolerances and rounding
    if a["rb"] > b["rb"] + slack:
        tol = max((s.tolerance.representation for s in m4 if s.targets), default=None)
        if tol is None or a["rb"] > tol + slack:
            others = "/".join(dict.fromkeys(m for m in methods if m not in _HOLDS_SHARES)) or "the balance"
            why = ("tighten the m4 step's tolerance.representation" if tol is not None else
                   f"{others} does not hold attribute shares; add an m4 step with targets after it "
                   "(`mmbalance recipe --example` shows one)")
            lines.append(f"RB rose {b['rb']:.4f} -> {a['rb']:.4f}: {why}")
    if a["ab"] > b["ab"] + slack:
        tol = max((s.tolerance.association for s in m4 if s.associate), default=None)
        why = ("add an m4 step with associate: [[attribute, label]]" if tol is None
               else "tighten the m4 step's tolerance.association or associate the label that rose")
        lines.append(f"AB rose {b['ab']:.4f} -> {a['ab']:.4f}: {why}")
    for attr, probes in (report.get("leakage") or {}).items():
        if not isinstance(probes, dict):
            continue
        for feature, views in probes.items():
            before, after = views.get("before"), views.get("after")
            if before and after and after["excess"] > before["excess"] + 0.01 and after.get("readable", True):
                lines.append(f"leakage of {attr} from {feature.replace('_', ' ')} rose: excess over the majority rate "
                             f"{before['excess']:.3f} -> {after['excess']:.3f}")
    return lines


def print_summary(report: dict[str, Any], out: str, console: Console | None = None, recipe=None) -> None:
    console = console or make_console()
    rows, weights = report["rows"], report["weights"]
    drawn = weights["distinct_rows_kept"]
    console.print(
        f"[bold]mmbalance[/bold] {escape(report['method'])}: {rows['input']:,} input rows -> {rows['manifest']:,} in the "
        f"manifest ({drawn:,} drawn at least once, {rows['manifest'] - drawn:,} with repeats 0), {rows['rejected']:,} rejected"
    )
    for reason, n in rows["rejected_by_reason"].items():
        console.print(f"  rejected: {n:,} x {escape(reason)}")
    table = make_table("before / after (expected weights / realised repeats)",
                       [("metric", "left"), ("before", "right"), ("after (E)", "right"), ("after (repeats)", "right")])
    b, a, r = report["before"], report["after_expected"], report["after_realized"]
    table.add_row("rows", f"{weights['rows']:,}", count_text(weights["expected_rows"]), f"{weights['realized_rows']:,}")
    table.add_row("retention", "1.0000", _f(weights["retention"]), _f(weights["realized_retention"]))
    table.add_row("ESS, effective sample size", f"{weights['rows']:,}", count_text(weights["ess"]), count_text(weights["realized_ess"]))
    table.add_row("RB, representation bias", _f(b["rb"]), _f(a["rb"]), _f(r["rb"]))
    table.add_row("AB, association bias", _f(b["ab"]), _f(a["ab"]), _f(r["ab"]))
    for name in b["concept_balance"]:
        for key in ("gini", "normalized_entropy", "top1pct_share"):
            table.add_row(
                escape(f"{name} {key}"),
                _f(b["concept_balance"][name][key]),
                _f(a["concept_balance"][name][key]),
                _f(r["concept_balance"][name][key]),
            )
    console.print(table)
    console.print("RB: largest gap between an attribute value's share and its target; AB: largest gap "
                  "P(label | value) - P(label | other values); ESS: (sum w)^2 / sum w^2. Lower RB and AB are more balanced.")
    if weights["ess"] > weights["realized_rows"] + 0.5:
        console.print(f"ESS of the expected weights ({count_text(weights['ess'])}) counts every row with a fractional weight, "
                      f"so it can exceed the {weights['realized_rows']:,} rows a resample draws.")
    console.print(f"largest repeat count: {weights['max_repeats']}")
    families = report.get("constraint_families") or []
    if families:
        ftable = make_table("M4 constraint families",
                            [("family", "left"), ("n", "right"), ("tol", "right"), ("binding", "right"),
                             ("before", "right"), ("after", "right")])
        for fam in families:
            ftable.add_row(
                escape(fam["family"]), f"{fam['constraints']:,}", _f(fam["tolerance"]), f"{fam['at_tolerance']:,}",
                _f(fam["worst_moment"]["before"]), _f(fam["worst_moment"]["after_expected"]),
            )
        console.print(ftable)
        console.print("before / after: the worst |moment| / carrying weight; per label: |P(s | y) - pi|; "
                      "embedding: |moment| / (sd W)")
    for line in solver_lines(report.get("solution", {}), report.get("method", "")):
        console.print(escape(line))
    for line in leakage_lines(report.get("leakage", {})):
        console.print(escape(line))
    for line in regression_lines(report, recipe):
        console.print(f"[yellow]warning: {escape(line)}[/yellow]")
    console.print(f"report: {escape(join_uri(out, 'report.html'))} (and report.json); manifest: {escape(join_uri(out, 'manifest'))}/")


def print_validation(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    console.print(
        f"{summary['shards']} shards, {summary['rows']:,} rows: {summary['valid']:,} valid, {summary['rejected']:,} would be rejected"
    )
    for reason, n in summary["rejected_by_reason"].items():
        console.print(f"  {n:,} x {reason}")
    for ex in summary["examples"]:
        console.print(f"  e.g. {ex['shard']} row {ex['row']} uid={ex['uid']!r}: {ex['reason']}")
    unchecked = summary.get("shards_without_page_checksums") or []
    if unchecked:
        from mmbalance.inspect import checksum_warning

        console.print(f"[yellow]{checksum_warning(unchecked, summary['shards'])}[/yellow]", soft_wrap=True)
    for note in summary.get("notes", []):
        console.print(f"note: {note}")


def solver_lines(solution: dict[str, Any], method: str = "") -> list[str]:
    """One line per solved step: status, violation and, when infeasible, the largest feasible retention."""
    steps = solution.get("steps") or [{"method": method, **solution}]
    lines = []
    for step in steps:
        if "status" not in step:
            continue
        parts = [f"solver {step.get('method', '')}: {step['status']}"]
        if step.get("max_violation") is not None:
            parts.append(f"max violation {step['max_violation']:.2e}")
        if step.get("largest_feasible_retention") is not None:
            parts.append(f"largest feasible retention {step['largest_feasible_retention']:.4f}")
        binding = step.get("binding") or step.get("binding_constraints")
        if binding:
            parts.append(f"{len(binding)} binding constraints")
        lines.append(", ".join(parts))
    return lines


def _accuracy(probe: dict[str, Any]) -> str:
    ci = probe.get("accuracy_ci")
    return f"{probe['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def leakage_lines(leakage: dict[str, Any]) -> list[str]:
    """Probe accuracy (with its interval) before -> after against the majority rate, per attribute
    and feature set; a probe scored on too few rows says so."""
    lines = []
    for attr, probes in leakage.items():
        if not isinstance(probes, dict):
            continue
        for feature, views in probes.items():
            before, after = views.get("before"), views.get("after")
            what = f"leakage {attr} from {feature.replace('_', ' ')}"
            if not before or not after:
                lines.append(f"{what}: too few rows to fit a probe")
                continue
            line = (f"{what}: accuracy {_accuracy(before)} -> {_accuracy(after)} "
                    f"(majority {before['majority_rate']:.3f} -> {after['majority_rate']:.3f})")
            unreadable = [f"{v} {p['effective_test_rows']:,.0f}" for v, p in (("before", before), ("after", after))
                          if not p.get("readable", True)]
            if unreadable:
                line += f"; too few scored rows to read ({', '.join(unreadable)} effective)"
            lines.append(line)
    return lines
