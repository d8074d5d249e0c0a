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


GENDERS = ["woman", "man"]
AGES = ["young", "middle", "old"]


def concept_signatures(seed: int, concepts: int, rows: int, occupations: int = 100) -> tuple[pa.Table, dict]:
    """A signature table at concept scale: each row is (gender or null, age or null, one of
    ``concepts`` clusters with Zipf-like sizes, occupation of ``occupations`` or null), with gender
    and age planted per concept and occupation so head concepts' association constraints bind.
    ``rows`` rows are drawn and grouped: the signature count is what distinct rows there are."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, concepts + 1) ** 1.1
    concept = rng.choice(concepts, size=rows, p=zipf / zipf.sum())
    occ_p = 1.0 / np.arange(1, occupations + 1) ** 0.8
    occ = np.where(rng.random(rows) < 0.5, occupations, rng.choice(occupations, size=rows, p=occ_p / occ_p.sum()))
    lean_c = rng.normal(0.0, 0.6, concepts)
    lean_o = np.append(rng.normal(0.0, 0.6, occupations), 0.0)
    p_woman = 1.0 / (1.0 + np.exp(-(lean_c[concept] + lean_o[occ])))
    gender = np.where(rng.random(rows) < 0.3, 2, (rng.random(rows) >= p_woman).astype(np.int64))
    age_logits = rng.normal(0.0, 0.5, (concepts, 3))[concept]
    age_p = np.exp(age_logits) / np.exp(age_logits).sum(axis=1, keepdims=True)
    age = np.where(rng.random(rows) < 0.4, 3, (rng.random(rows)[:, None] > np.cumsum(age_p, axis=1)).sum(axis=1))
    code = ((concept * (occupations + 1) + occ) * 3 + gender) * 4 + age
    uniq, counts = np.unique(code, return_counts=True)
    age_u, rest = uniq % 4, uniq // 4
    gender_u, rest = rest % 3, rest // 3
    occ_u, concept_u = rest % (occupations + 1), rest // (occupations + 1)
    concept_names = [f"c{i}" for i in range(concepts)]
    occ_names = [f"o{i}" for i in range(occupations)]

    def strings(codes: np.ndarray, names: list[str]) -> pa.Array:
        dictionary = pa.array(names, pa.string())
        valid = codes < len(names)
        indices = pa.array(np.where(valid, codes, 0).astype(np.int32), mask=~valid)
        return pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string())

    table = pa.table({
        "tag.gender": strings(gender_u, GENDERS), "tag.age": strings(age_u, AGES),
        "tag.concept": strings(concept_u, concept_names), "tag.occupation": strings(occ_u, occ_names),
        "count": pa.array(counts.astype(np.int64)),
    })
    vocab = {"gender": GENDERS, "age": AGES, "concept": concept_names, "occupation": occ_names}
    return table, vocab


def concept_stats(seed: int, concepts: int, rows: int, balance: dict, occupations: int = 100) -> CorpusStats:
    """``concept_signatures`` as solver input, under a recipe with the given balance step."""
    table, vocab = concept_signatures(seed, concepts, rows, occupations)
    recipe = parse_recipe({
        "attributes": [{"name": "gender", "values": GENDERS}, {"name": "age", "values": AGES}],
        "labels": [{"name": "concept"}, {"name": "occupation"}],
        "balance": balance,
    })
    return CorpusStats(recipe, table, vocab, int(np.asarray(table.column("count")).sum()))


CONCEPT_BALANCE = {
    "method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
    "associate": [["gender", "occupation"], ["gender", "concept"], ["age", "concept"]],
    "tolerance": {"representation": 0.01, "association": 0.002}, "retention": 0.6, "max_weight": 1.0,
}


class ListStream:
    """Tables standing in for the pipeline's kept rows; counts how often they were read."""

    def __init__(self, tables):
        self.parts = tables
        self.passes = 0

    def tables(self, columns):
        self.passes += 1
        for t in self.parts:
            yield t.select(columns)


def stop_first_newton_short(monkeypatch) -> None:
    """The first sparse Newton solve returns where it started, uncertified (later ones run): the
    solve must then go to the primal fallback."""
    import numpy as np

    from mmbalance.operators.solve.m4 import solve as m4_solve

    real = m4_solve.newton_solve
    calls = {"n": 0}

    def stops_short_once(dual, x, lo, hi, tol, bound, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return np.clip(x, lo, hi), {"certificate": False, "converged": False}
        return real(dual, x, lo, hi, tol, bound, **kw)

    monkeypatch.setattr(m4_solve, "newton_solve", stops_short_once)


def signature_codes(stats: CorpusStats, name: str, values: list[str]) -> np.ndarray:
    """Index of each signature's value of ``name`` in ``values``; -1 for null."""
    index = {v: i for i, v in enumerate(values)}
    return np.array([-1 if v is None else index[v] for v in stats.signatures.column(f"tag.{name}").to_pylist()])


def centred_attribute(step, name: str, values: list[str], code: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(carrying mask, a_s (s_sv - pi_v) per signature and value) from the spec: pi the target, else
    the prevalence among the carrying signatures weighted by ``w``."""
    carry = code >= 0
    if name in step.targets:
        pi = np.array([step.targets[name][v] for v in values])
    else:
        pi = np.bincount(code[carry], weights=w[carry], minlength=len(values)) / w[carry].sum()
    onehot = np.zeros((len(code), len(values)))
    onehot[np.flatnonzero(carry), code[carry]] = 1.0
    return carry, (onehot - pi) * carry[:, None]


def feasible(cons) -> bool:
    """Whether cvxpy (Clarabel) finds the constraints feasible."""
    import warnings

    prob = cp.Problem(cp.Minimize(0), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL)
    assert prob.status in ("optimal", "optimal_inaccurate", "infeasible", "infeasible_inaccurate"), prob.status
    return prob.status.startswith("optimal")
