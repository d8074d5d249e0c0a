"""MetaCLIP balancing (algorithms.md section 4): value e of a label is kept with p_e = t / max(c_e, t)."""

from __future__ import annotations

import polars as pl

from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.schemas.contract import tag_column
from mmbalance.schemas.balance import CapBalance


def cap_probabilities(counts: dict[str, int], cap: int) -> dict[str, float]:
    """Head values are thinned to about ``cap`` expected rows; tail values keep everything."""
    return {value: cap / max(count, cap) for value, count in counts.items()}


@register("cap")
def solve_cap(step: CapBalance, stats: CorpusStats) -> LookupSolution:
    column = tag_column(step.by)
    frame = pl.from_arrow(stats.signatures).group_by(column).agg(pl.col("count").sum()).sort(column, nulls_last=True)
    counts = {v: int(c) for v, c in zip(frame[column].to_list(), frame["count"].to_list()) if v is not None}
    unlabeled = int(frame.filter(pl.col(column).is_null())["count"].sum())
    probs = cap_probabilities(counts, step.cap)
    keys: list[str | None] = sorted(probs)
    weight = [probs[k] for k in keys]
    unlabeled_weight = 1.0 if step.unlabeled == "keep" else 0.0
    keys.append(None)
    weight.append(unlabeled_weight)
    capped = {k: counts[k] for k in sorted(counts, key=lambda k: -counts[k]) if counts[k] > step.cap}
    return LookupSolution(
        method="cap",
        key_columns=[column],
        keys={column: keys},
        weight=weight,
        default=None,
        diagnostics={
            "by": step.by,
            "cap": step.cap,
            "values": len(counts),
            "values_capped": len(capped),
            "largest_counts": dict(list(capped.items())[:20]),
            "unlabeled_rows": unlabeled,
            "unlabeled_weight": unlabeled_weight,
            "expected_rows": sum(min(c, step.cap) for c in counts.values()) + unlabeled * unlabeled_weight,
        },
    )
