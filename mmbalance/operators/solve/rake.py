"""Raking / iterative proportional fitting (docs/algorithms.md section 6) over the signature table.

Each marginal is a share among the rows carrying that column (null = no value, as for RB): a step
rescales the carrying rows by target / current share and leaves the others alone. Cycles until the
largest share error is below the tolerance; the weights are then scaled to the requested retention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.schemas.balance import RakeBalance
from mmbalance.schemas.contract import tag_column


def rake_weights(
    counts: np.ndarray, codes: list[np.ndarray], targets: list[np.ndarray], tolerance: float, max_iterations: int
) -> tuple[np.ndarray, int, float]:
    """IPF on per-signature weights; ``codes[c]`` is the value index per signature (-1 = none)."""
    w = np.ones_like(counts, dtype=np.float64)
    error = np.inf
    it = 0
    for it in range(1, max_iterations + 1):
        for code, target in zip(codes, targets):
            has = code >= 0
            mass = np.bincount(code[has], weights=(counts * w)[has], minlength=len(target))
            total = mass.sum()
            if total <= 0:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                factor = np.where(mass > 0, target * total / mass, 0.0)
            w[has] *= factor[code[has]]
        error = _max_error(counts, w, codes, targets)
        if error <= tolerance:
            break
    return w, it, error


def _max_error(counts, w, codes, targets) -> float:
    worst = 0.0
    for code, target in zip(codes, targets):
        has = code >= 0
        mass = np.bincount(code[has], weights=(counts * w)[has], minlength=len(target))
        if mass.sum() > 0:
            worst = max(worst, float(np.max(np.abs(mass / mass.sum() - target))))
        elif has.any():  # every carrying row went to weight 0: no share can match its target
            worst = max(worst, float(np.max(target)))
    return worst


@register("rake")
def solve_rake(step: RakeBalance, stats: CorpusStats) -> LookupSolution:
    recipe = stats.recipe
    attrs = {a.name: list(a.values) for a in recipe.attributes}
    labels = recipe.label_names()
    for name in step.targets:
        if name not in attrs:
            raise ValueError(f"balance.targets names '{name}', which is not an attribute (attributes: {sorted(attrs)})")
    for name in step.label_targets:
        if name not in labels:
            raise ValueError(f"balance.label_targets names '{name}', which is not a label (labels: {labels})")
    columns: list[tuple[str, str, dict[str, float], list[str]]] = []
    for name, shares in step.targets.items():
        columns.append(("targets", name, shares, attrs[name]))
    for name, shares in step.label_targets.items():
        vocab = list(stats.vocab.get(name, []))
        unknown = sorted(set(shares) - set(vocab))
        if unknown:
            raise ValueError(f"balance.label_targets.{name} has values no row carries: {unknown}")
        columns.append(("label_targets", name, shares, vocab))
    key_cols = [tag_column(name) for _, name, _, _ in columns]
    frame = (
        pl.from_arrow(stats.signatures).group_by(key_cols).agg(pl.col("count").sum())
        .sort(key_cols, nulls_last=True)
    )
    counts = frame["count"].to_numpy().astype(np.float64)
    codes, targets = [], []
    for key, name, shares, values in columns:
        index = {v: i for i, v in enumerate(values)}
        code = np.array([-1 if v is None else index[v] for v in frame[tag_column(name)].to_list()], dtype=np.int64)
        target = np.array([float(shares.get(v, 0.0)) for v in values])
        present = np.bincount(code[code >= 0], weights=counts[code >= 0], minlength=len(values))
        missing = [v for v, t, c in zip(values, target, present) if t > 0 and c == 0]
        if missing:
            raise ValueError(f"balance.{key}.{name} gives a share to values no row has: {missing}")
        codes.append(code)
        targets.append(target)
    n = counts.sum()
    w, iterations, error = rake_weights(counts, codes, targets, step.tolerance, step.max_iterations)
    if n > 0 and (counts * w).sum() > 0:
        w *= step.retention * n / (counts * w).sum()
    converged = error <= step.tolerance
    diagnostics: dict[str, Any] = {
        "converged": bool(converged),
        "iterations": iterations,
        "max_share_error": error,
        "tolerance": step.tolerance,
        "retention": float((counts * w).sum() / n) if n else 0.0,
        "ess": float((counts * w).sum() ** 2 / (counts * w**2).sum()) if n else 0.0,
        "largest_weight": float(w.max()) if w.size else 0.0,
        "signatures": int(frame.height),
    }
    if not converged:
        diagnostics["warning"] = (
            f"raking stopped after {iterations} iterations with share error {error:.3g} > balance.tolerance "
            "(targets may be incompatible with the corpus's joint counts)"
        )
    return LookupSolution(
        method="rake",
        key_columns=key_cols,
        keys={c: frame[c].to_list() for c in key_cols},
        weight=w.tolist(),
        default=None,
        diagnostics=diagnostics,
    )
