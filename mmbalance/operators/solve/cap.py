"""MetaCLIP balancing (docs/algorithms.md section 4): value e of a label is kept with p_e = t / max(c_e, t)
(the arithmetic: ``operators/metaclip.py``)."""

from __future__ import annotations

import numpy as np
import polars as pl

from mmbalance.operators.metaclip import capped_entries, keep_rate
from mmbalance.operators.solve import CorpusStats, EntryCapSolution, LookupSolution, register
from mmbalance.schemas.contract import entries_column, tag_column
from mmbalance.schemas.balance import CapBalance


def cap_probabilities(counts: dict[str, int], cap: int) -> dict[str, float]:
    """Head values are thinned to about ``cap`` expected rows; tail values keep everything."""
    return {value: keep_rate(count, cap) for value, count in counts.items()}


def solve_entry_cap(step: CapBalance, stats: CorpusStats) -> EntryCapSolution:
    """MetaCLIP proper: the cap over metadata entries (a row may match many)."""
    counts = stats.entry_counts[step.by]
    capped, p = capped_entries(counts, step.cap)
    spec = next(lab for lab in stats.recipe.metadata_labels() if lab.name == step.by)
    matched = int((counts > 0).sum())
    return EntryCapSolution(
        method="cap",
        column=entries_column(step.by),
        capped_ids=capped.tolist(),
        capped_p=p.tolist(),
        unlabeled_weight=1.0 if step.unlabeled == "keep" else 0.0,
        diagnostics={
            "by": step.by, "cap": step.cap, "entries": len(counts), "entries_matched": matched,
            "values": matched, "values_capped": len(capped),
            "largest_counts": {int(i): int(counts[i]) for i in capped[np.argsort(-counts[capped])][:20]},
            "entries_file": spec.metadata.entries,
            "unlabeled_weight": 1.0 if step.unlabeled == "keep" else 0.0,
        },
    )


@register("cap")
def solve_cap(step: CapBalance, stats: CorpusStats) -> LookupSolution | EntryCapSolution:
    if step.by in stats.entry_counts:
        return solve_entry_cap(step, stats)
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
