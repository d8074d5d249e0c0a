"""Bias and balance metrics (docs/algorithms.md section 7), computed from signature tables.

A signature table has the tag columns and one weight column (``count`` before balancing, ``w_sum``
for the expected weights, ``rep_sum`` for the realised repeats), so every metric is exact for the
whole corpus and costs nothing to recompute.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from mmbalance.schemas.contract import tag_column
from mmbalance.schemas.recipe import Recipe


def attribute_representation(frame: pl.DataFrame, weight: str, attr: str, values: list[str], target: dict[str, float]) -> dict[str, Any]:
    """Shares of each value among rows carrying the attribute; RB = max_k |pi_k - E_w[s_k]|."""
    col = tag_column(attr)
    carrying = frame.filter(pl.col(col).is_not_null())
    total = float(carrying[weight].sum()) if carrying.height else 0.0
    shares, gaps = {}, {}
    for v in values:
        w = float(carrying.filter(pl.col(col) == v)[weight].sum()) if total else 0.0
        shares[v] = w / total if total else 0.0
        gaps[v] = target[v] - shares[v]
    return {
        "carrying_weight": total,
        "share": shares,
        "target": target,
        "rb_vector": gaps,
        "rb": max((abs(g) for g in gaps.values()), default=0.0),
    }


def association_gaps(
    frame: pl.DataFrame, weight: str, attr: str, values: list[str], label: str, label_values: list[str], worst: int = 10
) -> dict[str, Any]:
    """AB table: E_w[y_r | s_k = 1] - E_w[y_r | s_k = 0] over rows carrying the attribute."""
    s_col, y_col = tag_column(attr), tag_column(label)
    carrying = frame.filter(pl.col(s_col).is_not_null())
    joint = carrying.group_by([s_col, y_col]).agg(pl.col(weight).sum().alias("w"))
    w_s = {v: float(joint.filter(pl.col(s_col) == v)["w"].sum()) for v in values}
    total = sum(w_s.values())
    table: dict[str, dict[str, float]] = {}
    pairs = []
    lookup = {(s, y): float(w) for s, y, w in joint.iter_rows()}
    for v in values:
        table[v] = {}
        rest = total - w_s[v]
        for r in label_values:
            both = lookup.get((v, r), 0.0)
            label_total = sum(lookup.get((u, r), 0.0) for u in values)
            p_in = both / w_s[v] if w_s[v] > 0 else 0.0
            p_out = (label_total - both) / rest if rest > 0 else 0.0
            gap = p_in - p_out
            table[v][r] = gap
            pairs.append((abs(gap), v, r, gap))
    pairs.sort(key=lambda p: (-round(p[0], 12), p[1], p[2]))  # ties must not flip on last-bit noise
    return {
        "attribute": attr,
        "label": label,
        "ab": pairs[0][0] if pairs else 0.0,
        "gaps": table,
        "worst_pairs": [{"value": v, "label": r, "gap": g} for _, v, r, g in pairs[:worst]],
    }


def concept_balance(frame: pl.DataFrame, weight: str, label: str) -> dict[str, Any]:
    """Distribution of weight over a label's values: entropy, Gini, share of the largest 1%."""
    col = tag_column(label)
    sizes = (
        frame.filter(pl.col(col).is_not_null()).group_by(col).agg(pl.col(weight).sum().alias("w"))["w"].to_numpy()
    )
    return balance_of_sizes(sizes)


def balance_of_sizes(sizes: np.ndarray) -> dict[str, Any]:
    """Entropy, Gini and top-1% share of a vector of (weighted) sizes, e.g. per cluster or entry."""
    sizes = np.asarray(sizes, np.float64)
    sizes = np.sort(sizes[sizes > 0])[::-1]
    if len(sizes) == 0:
        return {"values": 0, "entropy": 0.0, "normalized_entropy": 0.0, "gini": 0.0, "top1pct_share": 0.0, "largest": 0.0, "smallest": 0.0}
    p = sizes / sizes.sum()
    entropy = float(-(p * np.log(p)).sum())
    asc = np.sort(sizes)
    n = len(asc)
    gini = float((2 * np.arange(1, n + 1) - n - 1).dot(asc) / (n * asc.sum())) if n > 1 else 0.0
    top = max(1, math.ceil(0.01 * n))
    return {
        "values": int(n),
        "entropy": entropy,
        "normalized_entropy": entropy / math.log(n) if n > 1 else 1.0,
        "gini": gini,
        "top1pct_share": float(p[:top].sum()),
        "largest": float(sizes[0]),
        "smallest": float(sizes[-1]),
    }


def view_metrics(frame: pl.DataFrame, weight: str, recipe: Recipe, vocab: dict[str, list[str]]) -> dict[str, Any]:
    targets = recipe.attribute_targets()
    out: dict[str, Any] = {"total_weight": float(frame[weight].sum()) if frame.height else 0.0}
    out["representation"] = {
        a.name: attribute_representation(frame, weight, a.name, a.values, targets[a.name]) for a in recipe.attributes
    }
    out["rb"] = max((r["rb"] for r in out["representation"].values()), default=0.0)
    assoc = [
        association_gaps(frame, weight, a.name, a.values, lab, vocab[lab])
        for a in recipe.attributes
        for lab in recipe.label_names()
    ]
    out["association"] = assoc
    out["ab"] = max((x["ab"] for x in assoc), default=0.0)
    out["concept_balance"] = {lab: concept_balance(frame, weight, lab) for lab in recipe.label_names()}
    return out


def weight_summary(after: pl.DataFrame, rows: int) -> dict[str, Any]:
    def s(col: str) -> float:
        return float(after[col].sum()) if after.height else 0.0

    w_sum, w2_sum, rep_sum, rep2_sum = s("w_sum"), s("w2_sum"), s("rep_sum"), s("rep2_sum")
    return {
        "rows": rows,
        "expected_rows": w_sum,
        "retention": w_sum / rows if rows else 0.0,
        "ess": w_sum**2 / w2_sum if w2_sum else 0.0,
        "realized_rows": int(rep_sum),
        "realized_retention": rep_sum / rows if rows else 0.0,
        "realized_ess": rep_sum**2 / rep2_sum if rep2_sum else 0.0,
        "distinct_rows_kept": int(s("kept")),
        "max_repeats": int(after["rep_max"].max()) if after.height else 0,
    }


def _moment_matrix(frame: pl.DataFrame, weight: str, attr: str, values: list[str], pi: np.ndarray,
                   label: str | None, label_values: list[str]) -> np.ndarray:
    """M4 moments as shares of the carrying weight W: sum_w (s_k - pi_k) y_r / W, (m, R) for an
    association family (label) or (m, 1) for representation (label None)."""
    s_col = tag_column(attr)
    carrying = frame.filter(pl.col(s_col).is_not_null())
    total = float(carrying[weight].sum()) if carrying.height else 0.0
    m = len(values)
    if not total:
        return np.zeros((m, len(label_values) if label else 1))
    s_index = pl.DataFrame({s_col: values, "__k": np.arange(m)}, schema={s_col: pl.String, "__k": pl.Int64})
    if label is None:
        by = carrying.group_by(s_col).agg(pl.col(weight).sum().alias("w")).join(s_index, on=s_col)
        mass = np.zeros(m)
        mass[by["__k"].to_numpy()] = by["w"].to_numpy()
        return ((mass - pi * total) / total)[:, None]
    y_col = tag_column(label)
    R = len(label_values)
    y_index = pl.DataFrame({y_col: label_values, "__r": np.arange(R)}, schema={y_col: pl.String, "__r": pl.Int64})
    joint = (carrying.filter(pl.col(y_col).is_not_null()).group_by([s_col, y_col]).agg(pl.col(weight).sum().alias("w"))
             .join(s_index, on=s_col).join(y_index, on=y_col))
    mass = np.zeros((m, R))
    mass[joint["__k"].to_numpy(), joint["__r"].to_numpy()] = joint["w"].to_numpy()
    return (mass - pi[:, None] * mass.sum(axis=0)[None, :]) / total


def _conditional_gaps(frame: pl.DataFrame, weight: str, attr: str, values: list[str], pi: np.ndarray, label: str,
                      pooled: list[str]) -> np.ndarray:
    """|P_w(s = v | y = j) - pi_v| over attribute-carrying rows, per value v and label group j (each
    label value, the ``pooled`` ones as one group), for groups with positive weight: (m, groups)."""
    s_col, y_col = tag_column(attr), tag_column(label)
    carrying = frame.filter(pl.col(s_col).is_not_null() & pl.col(y_col).is_not_null())
    if not carrying.height:
        return np.zeros((len(values), 0))
    group = pl.when(pl.col(y_col).is_in(pooled)).then(pl.lit("\0pooled")).otherwise(pl.col(y_col)).alias("__g")
    joint = carrying.with_columns(group).group_by(["__g", s_col]).agg(pl.col(weight).sum().alias("w"))
    groups = sorted(set(joint["__g"].to_list()))
    index = {g: i for i, g in enumerate(groups)}
    mass = np.zeros((len(values), len(groups)))
    v_index = {v: k for k, v in enumerate(values)}
    for g, v, w in joint.iter_rows():
        mass[v_index[v], index[g]] += w
    total = mass.sum(axis=0)
    keep = total > 0
    return np.abs(mass[:, keep] / total[keep] - pi[:, None])


def constraint_families(recipe: Recipe, views: dict[str, tuple[pl.DataFrame, str]], vocab: dict[str, list[str]],
                        solution: dict[str, Any], embedding_sums: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per M4 step and constraint family (an attribute's representation, attribute x label set,
    per-label parity of attribute x label set, attribute x embedding): how many constraints, how
    many sit at their tolerance under the final expected weights, and the worst moment in each
    view: |sum_w (s_k - pi_k) y_r| / W (representation, association), the worst conditional gap
    |P_w(s = v | y = j) - pi_v| (per label), the worst |E_w[(s_v - pi_v) z_k]| / (sd_k W) (embedding;
    from ``embedding_sums``, the weigh stage's per-value sums of z under the manifest weights). At thousands of cluster labels this is the summary a
    reader can take in; the solver section keeps the individual constraints."""
    steps = solution.get("steps") or [solution]
    attrs = {a.name: a for a in recipe.attributes}
    out: list[dict[str, Any]] = []
    for index, (spec, diag) in enumerate(zip(recipe.balance_steps(), steps)):
        if spec.method != "m4" or "pi" not in diag:
            continue
        tol = spec.tolerance
        labelled = [(a, lab) for a, lab in dict.fromkeys(map(tuple, spec.associate)) if not lab.startswith("embedding.")]
        families: list[tuple[str, str | None, float, str]] = [(a, None, tol.representation, "representation") for a in spec.targets]
        families += [(a, lab, tol.association, "association") for a, lab in labelled if tol.association is not None]
        families += [(a, lab, tol.association_per_label, "association_per_label") for a, lab in labelled
                     if tol.association_per_label is not None]
        for attr, label, eps, kind in families:
            values = list(attrs[attr].values)
            # with hold_labels an untargeted attribute is centred per pair (the solver's pi_by_pair)
            shares = diag.get("pi_by_pair", {}).get(f"{attr} x {label}") or diag["pi"].get(attr, {})
            pi = np.array([float(shares.get(v, 0.0)) for v in values])
            label_values = list(vocab.get(label, [])) if label else []
            entry: dict[str, Any] = {
                "step": index, "family": f"{attr} x {label}" if label else f"{attr} representation",
                "kind": kind, "attribute": attr, "label": label,
                "tolerance": float(eps), "constraints": len(values) * (len(label_values) if label else 1),
            }
            pooled: list[str] = []
            if kind == "association_per_label":
                info = diag.get("per_label", {}).get(f"{attr} x {label}", {})
                pooled = list(info.get("pooled_values", []))
                entry.update(family=f"{attr} | {label} (per label)", bounded_values=info.get("bounded_values"),
                             pooled_values=pooled, min_support=info.get("min_support"),
                             constraints=len(values) * ((info.get("bounded_values") or 0) + (1 if pooled else 0)))
            worst: dict[str, float] = {}
            for view, (frame, weight) in views.items():
                if kind == "association_per_label":
                    moments = _conditional_gaps(frame, weight, attr, values, pi, label, pooled)
                else:
                    moments = _moment_matrix(frame, weight, attr, values, pi, label, label_values)
                worst[view] = float(np.abs(moments).max()) if moments.size else 0.0
                if view == "after_expected":
                    # at the bound up to the solver's precision: the constraints that bind
                    entry["at_tolerance"] = int((np.abs(moments) >= eps * (1 - 1e-6) - 1e-12).sum()) if eps > 0 else int(moments.size)
                    entry["over_tolerance"] = int((np.abs(moments) > eps * (1 + 1e-6) + 1e-9).sum())
            entry["worst_moment"] = worst
            out.append(entry)
        for fam in diag.get("embedding", {}).get("families", []):
            sums = (embedding_sums or {}).get(f"{fam['attribute']} x embedding.{fam['side']}")
            if sums:  # measured where the weights are applied (the weigh stage); absent outside a run
                out.append(_embedding_family(index, fam, sums))
    return out


def _embedding_family(step: int, fam: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
    """An embedding family's entry: |E_w[(s_v - pi_v) z_k]| / (sd_k E_w[carrying]) per view, from the
    per-value sums of z and of the weight (``RowMomentSolution.embedding_sums`` over every shard)."""
    eps = float(fam["tolerance"])
    entry: dict[str, Any] = {
        "step": step, "family": f"{fam['attribute']} x embedding.{fam['side']} ({fam['components']} PCs)",
        "kind": "embedding", "attribute": fam["attribute"], "label": f"embedding.{fam['side']}", "tolerance": eps,
        "constraints": fam["constraints"], "components": fam["components"], "worst_moment": {},
    }
    pi, sd = np.asarray(fam["pi"], np.float64), np.asarray(fam["sd"], np.float64)
    for view in ("before", "after_expected", "after_realized"):
        z, mass = np.asarray(sums["z"][view], np.float64), np.asarray(sums["mass"][view], np.float64)
        total = mass.sum()
        moments = (z - pi[:, None] * z.sum(axis=0)[None, :]) / (sd[None, :] * total) if total > 0 else np.zeros_like(z)
        entry["worst_moment"][view] = float(np.abs(moments).max()) if moments.size else 0.0
        if view == "after_expected":
            entry["at_tolerance"] = int((np.abs(moments) >= eps * (1 - 1e-6) - 1e-12).sum()) if eps > 0 else int(moments.size)
            entry["over_tolerance"] = int((np.abs(moments) > eps * (1 + 1e-6) + 1e-9).sum())
    return entry


def family_leakage(families: list[dict[str, Any]], leakage: dict[str, Any]) -> None:
    """Attach the dataset-leakage probe of each association family (attribute from that label set)."""
    for fam in families:
        if fam["label"] is None:
            continue
        probes = leakage.get(fam["attribute"], {})
        if fam["kind"] == "embedding":  # the embedding's own probe
            probe = probes.get(f"embedding_{fam['label'].split('.', 1)[1]}")
        else:
            probe = probes.get(f"dataset_{fam['label']}") or probes.get("dataset")
        if probe and probe.get("before") and probe.get("after"):
            fam["leakage"] = {view: {"accuracy": probe[view]["accuracy"], "majority_rate": probe[view]["majority_rate"]}
                              for view in ("before", "after")}


def build_report(recipe: Recipe, before: pa.Table, after: pa.Table, vocab: dict[str, list[str]],
                 solution: dict[str, Any] | None = None, embedding_sums: dict[str, Any] | None = None) -> dict[str, Any]:
    before_f, after_f = pl.from_arrow(before), pl.from_arrow(after)
    rows = int(before_f["count"].sum()) if before_f.height else 0
    report = {
        "weights": weight_summary(after_f, rows),
        "before": view_metrics(before_f, "count", recipe, vocab),
        "after_expected": view_metrics(after_f, "w_sum", recipe, vocab),
        "after_realized": view_metrics(after_f, "rep_sum", recipe, vocab),
    }
    if solution and any(step.method == "m4" for step in recipe.balance_steps()):
        views = {"before": (before_f, "count"), "after_expected": (after_f, "w_sum"), "after_realized": (after_f, "rep_sum")}
        report["constraint_families"] = constraint_families(recipe, views, vocab, solution, embedding_sums)
    return report
