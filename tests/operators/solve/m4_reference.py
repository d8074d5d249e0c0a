"""Random signature tables and an independent cvxpy formulation of M4 (algorithms.md section 1)."""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pyarrow as pa

from mmbalance.operators.solve import CorpusStats
from mmbalance.schemas.recipe import parse_recipe


def random_stats(
    seed: int, m: int = 2, R: int = 3, balance: dict | None = None, skew: float = 1.0, null_labels: bool = True
) -> CorpusStats:
    """Every (attribute value or null) x (label value [or null]) signature with a random count."""
    rng = np.random.default_rng(seed)
    values = [f"v{k}" for k in range(m)]
    labels = [f"l{r}" for r in range(R)]
    rows = list(itertools.product(values + [None], labels + ([None] if null_labels else [])))
    counts = rng.integers(1, 200, size=len(rows)).astype(np.float64)
    # planted association: value k is more common with label k
    for i, (s, y) in enumerate(rows):
        if s is not None and y is not None and values.index(s) == labels.index(y) % m:
            counts[i] *= 1 + skew
    recipe = parse_recipe({
        "attributes": [{"name": "g", "values": values}],
        "labels": [{"name": "occ"}],
        "balance": balance or {"method": "m4", "associate": [["g", "occ"]]},
    })
    table = pa.table({
        "tag.g": pa.array([s for s, _ in rows], pa.string()),
        "tag.occ": pa.array([y for _, y in rows], pa.string()),
        "count": pa.array(counts.astype(np.int64), pa.int64()),
    })
    return CorpusStats(recipe, table, {"g": values, "occ": labels}, int(counts.sum()))


def cvxpy_m4(stats: CorpusStats):
    """The primal written out row by row from the spec; returns (q per signature, objective per row)."""
    step = stats.recipe.balance
    t = stats.signatures.to_pydict()
    counts = np.array(t["count"], dtype=np.float64)
    n = counts.sum()
    w = counts / n
    values = stats.vocab["g"]
    carrying = np.array([s is not None for s in t["tag.g"]], dtype=np.float64)
    if "g" in step.targets:
        pi = np.array([step.targets["g"].get(v, 0.0) for v in values])
    else:
        obs = np.array([sum(c for s, c in zip(t["tag.g"], counts) if s == v) for v in values])
        pi = obs / obs.sum()
    s_mat = np.array([[1.0 if s == v else 0.0 for v in values] for s in t["tag.g"]])
    centred = (s_mat - pi) * carrying[:, None]
    cols, eps = [], []
    if "g" in step.targets:
        cols += [centred[:, k] for k in range(len(values))]
        eps += [step.tolerance.representation] * len(values)
    if step.associate:
        for k in range(len(values)):
            for r in stats.vocab["occ"]:
                y = np.array([1.0 if v == r else 0.0 for v in t["tag.occ"]])
                cols.append(centred[:, k] * y)
                eps.append(step.tolerance.association)
    b = np.stack(cols, axis=1)
    eta = np.full(len(w), step.retention)
    q = cp.Variable(len(w))
    if step.objective == "l2":
        obj = 0.5 * cp.sum(cp.multiply(w, cp.square(q - eta)))
    else:
        obj = cp.sum(cp.multiply(w, cp.kl_div(q, eta)))  # q log(q/eta) - q + eta
    W = (w * carrying) @ q
    cons = [q >= 0, q <= step.max_weight]
    for j in range(b.shape[1]):
        cons += [(w * b[:, j]) @ q <= eps[j] * W, -((w * b[:, j]) @ q) <= eps[j] * W]
    if step.budget:
        cons.append(w @ q == step.retention)
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return prob.status, (None if q.value is None else np.asarray(q.value)), prob.value
