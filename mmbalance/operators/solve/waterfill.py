"""Water-filling (docs/algorithms.md section 5): max-min fair quotas over clusters or label values.

``waterfill_quotas`` is the building block of hierarchical balanced sampling (the clustering
stage imports it); ``balance.method: waterfill`` applies it over the values of one label.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mmbalance.operators.quotas import waterfill_quotas  # noqa: F401 - also imported from here
from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.schemas.balance import WaterfillBalance
from mmbalance.schemas.contract import tag_column


@register("waterfill")
def solve_waterfill(step: WaterfillBalance, stats: CorpusStats) -> LookupSolution:
    """Each value of ``by`` keeps quota / count of its rows: the expected size is the quota."""
    labels = stats.recipe.label_names()
    if step.by not in labels:
        raise ValueError(f"balance.by names '{step.by}', which is not a label (labels: {labels})")
    column = tag_column(step.by)
    frame = pl.from_arrow(stats.signatures).group_by(column).agg(pl.col("count").sum()).sort(column, nulls_last=True)
    labeled = frame.filter(pl.col(column).is_not_null())
    values = labeled[column].to_list()
    # counts are weighted (floats) when water-filling follows another step: round to whole rows
    sizes = np.rint(labeled["count"].to_numpy()).astype(np.int64)
    total = int(sizes.sum())
    target = step.size if step.size is not None else int(round(step.retention * total))
    levels_info = None
    if step.hierarchical:
        quotas, levels_info = _hierarchical(stats.hierarchies[step.by], values, sizes, target)
    else:
        quotas = waterfill_quotas(sizes, target)
    weight = [float(q) / float(n) if n else 0.0 for q, n in zip(quotas, sizes)]
    unlabeled = int(frame.filter(pl.col(column).is_null())["count"].sum())
    unlabeled_weight = 1.0 if step.unlabeled == "keep" else 0.0
    cap = int(quotas.max()) if quotas.size else 0
    return LookupSolution(
        method="waterfill",
        key_columns=[column],
        keys={column: [*values, None]},
        weight=[*weight, unlabeled_weight],
        default=None,
        diagnostics={
            "by": step.by,
            "target": target,
            "labeled_rows": total,
            "expected_labeled_rows": int(quotas.sum()),
            "cap": cap,
            "values": len(values),
            "values_capped": int(np.sum(quotas < sizes)),
            "unlabeled_rows": unlabeled,
            "unlabeled_weight": unlabeled_weight,
            **({"hierarchy": levels_info} if levels_info else {}),
        },
    )


def _hierarchical(parents: list, values: list[str], sizes: np.ndarray, target: int) -> tuple[np.ndarray, dict]:
    """Quotas of the leaf values from water-filling top-down through the cluster hierarchy."""
    from mmbalance.operators.hierarchy import Hierarchy, hierarchical_quotas

    parents = [np.asarray(p, np.int64) for p in parents]
    k_leaf = len(parents[0])
    ks = [k_leaf] + [int(p.max()) + 1 if len(p) else 0 for p in parents]
    # only the level sizes matter for the quotas: centroids are placeholders
    tree = Hierarchy([np.zeros((k, 1)) for k in ks], parents)
    leaf_sizes = np.zeros(k_leaf, np.int64)
    ids = np.array([int(v) for v in values], np.int64)
    leaf_sizes[ids] = sizes
    per_level = hierarchical_quotas(tree, leaf_sizes, target)
    return per_level[0][ids], {"ks": ks, "top_level_quotas": per_level[-1].tolist()}
