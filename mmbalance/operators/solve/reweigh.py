"""Reweighing (Kamiran & Calders; docs/algorithms.md section 6): cell (s, y) gets n_s n_y / (n n_sy).

Cells are over the rows that carry both the attribute and the label; the others have no cell and
keep weight 1. When every (s, y) cell is non-empty, the marginals of s and y over those rows are
kept and s, y become independent; an empty cell makes exact independence impossible.
"""

from __future__ import annotations

import polars as pl

from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.schemas.balance import ReweighBalance
from mmbalance.schemas.contract import tag_column


def reweigh_cells(cells: dict[tuple[str, str], int]) -> dict[tuple[str, str], float]:
    """Closed form over a table of cell counts n_sy (zero cells absent)."""
    n = sum(cells.values())
    n_s: dict[str, int] = {}
    n_y: dict[str, int] = {}
    for (s, y), c in cells.items():
        n_s[s] = n_s.get(s, 0) + c
        n_y[y] = n_y.get(y, 0) + c
    return {(s, y): n_s[s] * n_y[y] / (n * c) for (s, y), c in cells.items() if c > 0}


@register("reweigh")
def solve_reweigh(step: ReweighBalance, stats: CorpusStats) -> LookupSolution:
    recipe = stats.recipe
    attrs = [a.name for a in recipe.attributes]
    labels = recipe.label_names()
    if step.attribute not in attrs:
        raise ValueError(f"balance.attribute names '{step.attribute}', which is not an attribute (attributes: {attrs})")
    if step.label not in labels:
        raise ValueError(f"balance.label names '{step.label}', which is not a label (labels: {labels})")
    s_col, y_col = tag_column(step.attribute), tag_column(step.label)
    frame = (
        pl.from_arrow(stats.signatures).group_by([s_col, y_col]).agg(pl.col("count").sum())
        .sort([s_col, y_col], nulls_last=True)
    )
    cells = {(s, y): int(c) for s, y, c in frame.iter_rows() if s is not None and y is not None and c > 0}
    weights = reweigh_cells(cells)
    keys = {s_col: [], y_col: []}
    weight = []
    for s, y, _ in frame.iter_rows():
        keys[s_col].append(s)
        keys[y_col].append(y)
        weight.append(weights.get((s, y), 1.0))
    n_cells = sum(cells.values())
    return LookupSolution(
        method="reweigh",
        key_columns=[s_col, y_col],
        keys=keys,
        weight=weight,
        default=None,
        diagnostics={
            "attribute": step.attribute,
            "label": step.label,
            "cells": len(cells),
            "rows_in_cells": n_cells,
            "rows_without_cell": int(frame["count"].sum()) - n_cells,
            "largest_weight": max(weight, default=1.0),
            "smallest_weight": min(weight, default=1.0),
        },
    )
