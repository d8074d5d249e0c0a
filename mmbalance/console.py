"""Terminal summaries (rich tables) of a run report and of a validation."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def print_summary(report: dict[str, Any], out: str, console: Console | None = None) -> None:
    console = console or Console()
    rows, weights = report["rows"], report["weights"]
    console.print(
        f"[bold]mmbalance[/bold] {report['method']}: {rows['input']:,} input rows, {rows['manifest']:,} in the manifest, "
        f"{rows['rejected']:,} rejected -> {out}"
    )
    for reason, n in rows["rejected_by_reason"].items():
        console.print(f"  rejected: {n:,} x {reason}")
    table = Table(title="before / after (expected weights / realised repeats)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after (E)", justify="right")
    table.add_column("after (repeats)", justify="right")
    b, a, r = report["before"], report["after_expected"], report["after_realized"]
    table.add_row("rows", f"{weights['rows']:,}", f"{weights['expected_rows']:,.1f}", f"{weights['realized_rows']:,}")
    table.add_row("retention", "1.0000", _f(weights["retention"]), _f(weights["realized_retention"]))
    table.add_row("ESS", f"{weights['rows']:,}", f"{weights['ess']:,.1f}", f"{weights['realized_ess']:,.1f}")
    table.add_row("RB (max)", _f(b["rb"]), _f(a["rb"]), _f(r["rb"]))
    table.add_row("AB (max)", _f(b["ab"]), _f(a["ab"]), _f(r["ab"]))
    for name in b["concept_balance"]:
        for key in ("gini", "normalized_entropy", "top1pct_share"):
            table.add_row(
                f"{name} {key}",
                _f(b["concept_balance"][name][key]),
                _f(a["concept_balance"][name][key]),
                _f(r["concept_balance"][name][key]),
            )
    console.print(table)
    console.print(f"largest repeat count: {weights['max_repeats']}")
    families = report.get("constraint_families") or []
    if families:
        ftable = Table(title="M4 constraint families (worst |moment| / carrying weight; per label: |P(s|y) - pi|; "
                             "embedding: |moment| / (sd W))")
        ftable.add_column("family", min_width=14)  # wraps on narrow terminals; the figures never do
        for col in ("n", "tol", "binding", "before", "after", "leakage"):
            ftable.add_column(col, justify="right", no_wrap=True, min_width=len(col))
        for fam in families:
            leak = fam.get("leakage")
            ftable.add_row(
                fam["family"], f"{fam['constraints']:,}", _f(fam["tolerance"]), f"{fam['at_tolerance']:,}",
                _f(fam["worst_moment"]["before"]), _f(fam["worst_moment"]["after_expected"]),
                f"{leak['before']['accuracy']:.3f} -> {leak['after']['accuracy']:.3f}" if leak else "",
            )
        console.print(ftable)
    for line in solver_lines(report.get("solution", {}), report.get("method", "")):
        console.print(line)
    for line in leakage_lines(report.get("leakage", {})):
        console.print(line)
    console.print(f"report: {out}/report.html (and report.json); manifest: {out}/manifest/")


def print_validation(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"{summary['shards']} shards, {summary['rows']:,} rows: {summary['valid']:,} valid, {summary['rejected']:,} would be rejected"
    )
    for reason, n in summary["rejected_by_reason"].items():
        console.print(f"  {n:,} x {reason}")
    for ex in summary["examples"]:
        console.print(f"  e.g. {ex['shard']} row {ex['row']} uid={ex['uid']!r}: {ex['reason']}")


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


def leakage_lines(leakage: dict[str, Any]) -> list[str]:
    """Probe accuracy before -> after against the majority rate, per attribute and feature set."""
    lines = []
    for attr, probes in leakage.items():
        if not isinstance(probes, dict):
            continue
        for feature, views in probes.items():
            before, after = views.get("before"), views.get("after")
            if not before or not after:
                continue
            lines.append(
                f"leakage {attr} from {feature.replace('_', ' ')}: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
                f"(majority {before['majority_rate']:.3f} -> {after['majority_rate']:.3f})"
            )
    return lines
