"""The solve step: merged statistics in, a small solution out; applying it is a per-shard map.

Every balancing method plugs in the same way: a solver function registered under the recipe's
``balance.method`` takes ``CorpusStats`` and returns a ``Solution``. A solution maps a row's tags
(and utility) to its weight and round-trips through JSON, so the weigh stage on any worker, or a
rerun after a crash, applies exactly what was solved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from mmbalance.schemas.recipe import Recipe


@dataclass
class CorpusStats:
    """What a solver may read: the merged signature table of valid, de-duplicated rows."""

    recipe: Recipe
    signatures: pa.Table  # tag.<name> string columns, count[, utility_sum]
    vocab: dict[str, list[str]]  # values seen per attribute/label name
    total_rows: int
    # a seeded uniform sample of valid rows (row, uid, tag.* columns, image_emb/text_emb as
    # fixed_size_list float16) for methods that need embeddings, e.g. R&B; None when not sampled
    sample: pa.Table | None = None
    # evaluation rows (image_emb) for methods that weigh domains by an evaluation set (R&B)
    eval_sample: pa.Table | None = None
    # per metadata label: rows matching each entry (MetaCLIP counts), indexed by entry id
    entry_counts: dict[str, np.ndarray] = field(default_factory=dict)
    # cluster hierarchies by name: parents[l][i] = level-(l+2) cluster of level-(l+1) cluster i
    hierarchies: dict[str, list[np.ndarray]] = field(default_factory=dict)
    # the kept rows' tags, shard by shard, for methods that need every row (M4 with per-row utility
    # or embedding moments)
    rows: "RowStream | None" = None
    # principal components per embedding side (fitted on the sample) for M4's embedding moments
    embedding_bases: dict[str, Any] = field(default_factory=dict)
    # the earlier balance steps' weights when a per-row step comes last in a composition
    prior: "LookupSolution | None" = None


class RowStream(Protocol):
    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """The kept rows (valid, first occurrence) of each shard in turn, ``columns`` only."""
        ...


class Solution(Protocol):
    method: str
    diagnostics: dict[str, Any]

    def weights(self, tags: pa.Table) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class LookupSolution:
    """Weight as a function of some tag columns: covers cap, reweighing, water-filling over labels
    and every method solved over hard-tag signatures."""

    method: str
    key_columns: list[str]  # tags-table column names
    keys: dict[str, list[str | None]]
    weight: list[float]
    default: float | None = None  # weight of a key not in the table; None: an unseen key is an error
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def weights(self, tags: pa.Table) -> np.ndarray:
        if not self.key_columns:
            return np.full(tags.num_rows, self.weight[0] if self.weight else (self.default or 0.0))
        left = pl.from_arrow(tags.select(self.key_columns))
        if isinstance(left, pl.Series):  # pragma: no cover
            left = left.to_frame()
        right = pl.DataFrame(
            {**{c: pl.Series(c, self.keys[c], dtype=pl.String) for c in self.key_columns},
             "__w": pl.Series("__w", self.weight, dtype=pl.Float64)}
        )
        joined = left.join(right, on=self.key_columns, how="left", nulls_equal=True, maintain_order="left")
        w = joined.get_column("__w").to_numpy()
        missing = np.isnan(w)
        if missing.any():
            if self.default is None:
                example = left.row(int(np.flatnonzero(missing)[0]))
                raise ValueError(f"solution '{self.method}' has no weight for tags {dict(zip(self.key_columns, example))}")
            w = np.where(missing, self.default, w)
        return w

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "lookup",
            "method": self.method,
            "key_columns": self.key_columns,
            "keys": self.keys,
            "weight": self.weight,
            "default": self.default,
            "diagnostics": self.diagnostics,
        }


SolverFn = Callable[[Any, CorpusStats], Solution]
SOLVERS: dict[str, SolverFn] = {}


def register(method: str) -> Callable[[SolverFn], SolverFn]:
    def deco(fn: SolverFn) -> SolverFn:
        SOLVERS[method] = fn
        return fn

    return deco


def _solve_step(step, stats: CorpusStats) -> Solution:
    _load_solvers()
    try:
        solver = SOLVERS[step.method]
    except KeyError:
        raise ValueError(f"balance.method '{step.method}' has no solver (known: {sorted(SOLVERS)})") from None
    return solver(step, stats)


def solve(stats: CorpusStats) -> Solution:
    """Solve the recipe's balance step, or compose its steps: step k sees the signature counts
    weighted by steps 1..k-1 and the final weight is the product (e.g. water-fill over clusters,
    then M4 on the water-filled distribution)."""
    steps = stats.recipe.balance_steps()
    if len(steps) == 1:
        return _solve_step(steps[0], stats)
    sig = stats.signatures
    tag_columns = [c for c in sig.column_names if c.startswith("tag.")]
    count = np.asarray(sig.column("count").to_numpy(), dtype=np.float64)
    weight = np.ones(sig.num_rows)
    diagnostics = []
    for i, step in enumerate(steps):
        weighted = sig.set_column(sig.schema.get_field_index("count"), "count", pa.array(count * weight))
        if "utility_sum" in sig.column_names:
            util = np.asarray(sig.column("utility_sum").to_numpy(), dtype=np.float64) * weight
            weighted = weighted.set_column(sig.schema.get_field_index("utility_sum"), "utility_sum", pa.array(util))
        if i == len(steps) - 1 and _per_row(step):
            # embedding moments are solved over rows: the earlier steps' weights enter as each row's prior
            prior = LookupSolution("prior", tag_columns, {c: sig.column(c).to_pylist() for c in tag_columns},
                                   weight.tolist(), None)
            part = _solve_step(step, replace(stats, signatures=weighted, prior=prior))
            kept = float((count * weight).sum())
            diagnostics.append({"step": i, "method": step.method, **part.diagnostics,
                                "retention_so_far": part.diagnostics.get("retention", 0.0) * kept / count.sum() if count.sum() else 0.0})
            part.method = "+".join(st.method for st in steps)
            part.diagnostics = {"steps": diagnostics}
            return part
        # per-row streaming would ignore the earlier steps' weights: later steps see signatures only
        part = _solve_step(step, replace(stats, signatures=weighted, rows=None))
        weight = weight * part.weights(sig.select(tag_columns))
        diagnostics.append({"step": i, "method": step.method, **part.diagnostics,
                            "retention_so_far": float((count * weight).sum() / count.sum()) if count.sum() else 0.0})
    return LookupSolution(
        method="+".join(step.method for step in steps),
        key_columns=tag_columns,
        keys={c: sig.column(c).to_pylist() for c in tag_columns},
        weight=weight.tolist(),
        default=None,
        diagnostics={"steps": diagnostics},
    )


def _per_row(step) -> bool:
    """A step solved over rows whatever the signatures (M4 with embedding moments)."""
    from mmbalance.schemas.balance import embedding_pairs

    return bool(embedding_pairs(step))


@dataclass
class EntryCapSolution:
    """MetaCLIP over metadata entries: a row matching entries E is kept with 1 - prod_{e in E}(1 - p_e).
    Only capped entries (p_e < 1) are stored: tail entries keep everything."""

    method: str
    column: str  # the list<int32> entries column of the tags table
    capped_ids: list[int]
    capped_p: list[float]
    unlabeled_weight: float
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def weights(self, tags: pa.Table) -> np.ndarray:
        arr = tags.column(self.column).combine_chunks()
        ids = pa.compute.list_flatten(arr).to_numpy(zero_copy_only=False)
        parents = pa.compute.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        p = np.ones(len(ids))
        if self.capped_ids and len(ids):
            capped = np.asarray(self.capped_ids, np.int64)
            pos = np.clip(np.searchsorted(capped, ids), 0, len(capped) - 1)
            hit = capped[pos] == ids
            p[hit] = np.asarray(self.capped_p)[pos[hit]]
        with np.errstate(divide="ignore"):  # log1p(-1) = -inf: a tail entry keeps the row for sure
            log_drop = np.bincount(parents, weights=np.log1p(-p), minlength=len(arr))
        w = 1.0 - np.exp(log_drop)
        matched = np.bincount(parents, minlength=len(arr)) > 0
        return np.where(matched, w, self.unlabeled_weight)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "entry_cap", "method": self.method, "column": self.column, "capped_ids": self.capped_ids,
                "capped_p": self.capped_p, "unlabeled_weight": self.unlabeled_weight, "diagnostics": self.diagnostics}


@dataclass
class SampleBaselineSolution:
    """M4 with per-row baselines: q_i = clip(eta_i - t_s(i), 0, Q) (L2) or min(eta_i exp(-t_s), Q)
    (KL), eta_i = clip(retention u_i / mean(u), 0, Q); ``t`` per signature from the solved duals."""

    method: str
    key_columns: list[str]
    keys: dict[str, list[str | None]]
    t: list[float]
    retention: float
    mean_utility: float
    max_weight: float
    objective: str
    utility_column: str
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def weights(self, tags: pa.Table) -> np.ndarray:
        t = LookupSolution(self.method, self.key_columns, self.keys, self.t).weights(tags)
        u = np.asarray(tags.column(self.utility_column).to_numpy(zero_copy_only=False), np.float64)
        eta = np.clip(self.retention * u / self.mean_utility, 0.0, self.max_weight) if self.mean_utility > 0 \
            else np.full(len(u), min(self.retention, self.max_weight))
        if self.objective == "l2":
            return np.clip(eta - t, 0.0, self.max_weight)
        return np.minimum(eta * np.exp(-t), self.max_weight)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sample_baseline", **{k: getattr(self, k) for k in (
            "method", "key_columns", "keys", "t", "retention", "mean_utility", "max_weight", "objective",
            "utility_column", "diagnostics")}}


def solution_from_dict(data: dict[str, Any]) -> Solution:
    if data.get("kind") == "row_moments":
        from mmbalance.operators.solve.row_solution import RowMomentSolution

        return RowMomentSolution.from_dict(data)
    if data.get("kind") == "sample_baseline":
        return SampleBaselineSolution(**{k: v for k, v in data.items() if k != "kind"})
    if data.get("kind") == "lookup":
        fields = {k: data[k] for k in ("method", "key_columns", "keys", "weight", "default", "diagnostics")}
        return LookupSolution(**fields)
    if data.get("kind") == "entry_cap":
        fields = {k: data[k] for k in ("method", "column", "capped_ids", "capped_p", "unlabeled_weight", "diagnostics")}
        return EntryCapSolution(**fields)
    raise ValueError(f"unknown solution kind {data.get('kind')!r}")


@register("none")
def solve_none(step, stats: CorpusStats) -> Solution:
    return LookupSolution("none", [], {}, [1.0], default=1.0, diagnostics={"note": "every valid row kept once"})


_SOLVER_MODULES = ("cap", "m4", "reweigh", "rake", "waterfill", "rnb")


def _load_solvers() -> None:
    """Import the solver modules, which register themselves: at the first solve, not on import, so
    a worker that only applies a solution (the weigh stage) does not load scipy (~0.4 s, ~50 MB)."""
    import importlib

    for name in _SOLVER_MODULES:
        importlib.import_module(f"mmbalance.operators.solve.{name}")
