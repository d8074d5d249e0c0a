"""The M4 problem as the solver sees it, built from the recipe and the signature table
(docs/algorithms.md sections 1 and 8).

Every constraint coordinate j is two inequalities ``|sum_s w_s q_s B_{s,col(j)}| <= eps_j sum_s w_s
q_s E_{s,scale(j)}``: a column of B (its moment) and a scale column of E = [A | L]: the attribute
group's carrying indicator (representation, global association, embedding moments) or a label
value's own carrying rows (per-label parity, docs/algorithms.md section 8). Coordinates may share a
B column (a label value under both the global and the per-label bound); the dual then stays
sparse and the largest-retention LP an LP. Embedding moments (the per-row path) add coordinates
whose moment is a per-row column: their shift rows follow the signature part (``m4_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from mmbalance.operators.solve import CorpusStats
from mmbalance.operators.solve.m4_stream import SampleStream
from mmbalance.schemas.balance import EMBEDDING_LABELS, M4Balance, embedding_pairs
from mmbalance.schemas.contract import tag_column

if TYPE_CHECKING:
    from mmbalance.operators.solve.m4_embedding import EmbeddingMoments


@dataclass
class MomentProblem:
    """The compressed problem; ``weight`` is counts / n so every quantity is O(1) whatever n is.

    Shift rows (the columns of N = [B, -E, H, 1, Z] that the duals move): B's Kb columns, the P
    scale columns, the R held masses, the budget, then the Kz embedding coordinates."""

    weight: np.ndarray  # (S,) share of rows per signature, sums to 1
    rows: int  # n
    eta: np.ndarray  # (S,) baseline keep rate in [0, Q]
    B: sp.csr_matrix  # (S, Kb) b_sj (zero on rows not carrying the coordinate's attribute)
    A: sp.csr_matrix  # (S, G) 1 where the signature carries attribute group g
    group: np.ndarray  # (K,) attribute group of each coordinate
    eps: np.ndarray  # (K,) tolerance of each coordinate
    max_weight: float  # Q
    budget: float | None  # target of sum_s weight_s q_s (the retention); None: no budget
    objective: str = "l2"
    # per-row baselines (utility per sample): q, f and curvature are per-signature means over rows
    stream: "SampleStream | None" = None
    # held masses (equalities with free duals): sum_s weight_s q_s H_sh = hold_target_h
    H: sp.csr_matrix | None = None
    hold_target: np.ndarray | None = None
    column: np.ndarray | None = None  # (K,) shift row of each coordinate's moment; None: coordinate j is B column j
    scale: np.ndarray | None = None  # (K,) scale column (< G: group carrying; else L[:, scale - G]); None: group
    L: sp.csr_matrix | None = None  # (S, PL) per-label scale columns: carrying rows with the label value(s)
    embedding: "EmbeddingMoments | None" = None  # embedding-moment coordinates (per-row path)

    def __post_init__(self) -> None:
        if self.column is None:
            self.column = np.arange(len(self.eps), dtype=np.int64)
        if self.scale is None:
            self.scale = np.asarray(self.group, np.int64).copy()

    @property
    def holds(self) -> int:
        return 0 if self.H is None else self.H.shape[1]

    @property
    def K(self) -> int:
        return len(self.eps)

    @property
    def Kb(self) -> int:
        return self.B.shape[1]

    @property
    def G(self) -> int:
        return self.A.shape[1]

    @property
    def P(self) -> int:
        return self.G + (0 if self.L is None else self.L.shape[1])

    @property
    def E(self) -> sp.csr_matrix:
        return self.A.tocsr() if self.L is None else sp.hstack([self.A, self.L], format="csr")

    @property
    def Kz(self) -> int:
        return 0 if self.embedding is None else self.embedding.size

    @property
    def signature_coordinates(self) -> np.ndarray:
        """Indices of the coordinates whose moment is a column of B (not an embedding moment)."""
        return np.flatnonzero(self.column < self.Kb)


# -- naming the coordinates -------------------------------------------------------------------------


@dataclass
class Coordinate:
    kind: str  # representation | association | association_per_label | embedding
    attribute: str
    value: str
    label: str | None = None
    label_value: str | None = None

    def name(self) -> str:
        base = f"{self.attribute}={self.value}"
        if self.label is None:
            return base
        sep = " | " if self.kind == "association_per_label" else " x "
        return f"{base}{sep}{self.label}={self.label_value}"


class Coordinates:
    """The constraint coordinates in blocks (one per attribute, one per associated pair and bound),
    named on demand: a million Coordinate objects would cost more than the solve."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, str, str, list[str], str | None, list[str] | None]] = []  # (start, ...)
        self.size = 0
        self.kept: np.ndarray | None = None  # coordinate ids kept after dropping untouched ones

    def add(self, kind: str, attribute: str, values: list[str], label: str | None = None,
            label_values: list[str] | None = None) -> None:
        self.blocks.append((self.size, kind, attribute, values, label, label_values))
        self.size += len(values) * (len(label_values) if label is not None else 1)

    def keep(self, used: np.ndarray) -> None:
        self.kept = np.asarray(used)

    def __len__(self) -> int:
        return self.size if self.kept is None else len(self.kept)

    def __getitem__(self, j: int) -> Coordinate:
        j = int(j if self.kept is None else self.kept[j])
        starts = [b[0] for b in self.blocks]
        start, kind, attribute, values, label, label_values = self.blocks[int(np.searchsorted(starts, j, side="right")) - 1]
        local = j - start
        if label is None:
            return Coordinate(kind, attribute, values[local])
        R = len(label_values)
        return Coordinate(kind, attribute, values[local // R], label, label_values[local % R])


def _codes(column: pl.Series, values: list[str]) -> np.ndarray:
    """Index of each entry in ``values``; -1 for null, -2 for a value not in the list (vectorised)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.to_arrow()
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(pa.string())
    index = pc.index_in(arr, value_set=pa.array(values, arr.type))
    out = index.fill_null(-2).to_numpy(zero_copy_only=False).astype(np.int64)
    out[arr.is_null().to_numpy(zero_copy_only=False)] = -1
    return out


# -- building ---------------------------------------------------------------------------------------


class _Builder:
    """Accumulates B columns, scale columns and coordinates (col, scale, eps, group) in order."""

    def __init__(self, S: int, G: int) -> None:
        self.S, self.G = S, G
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.ncols = 0
        self.scale_rows: list[np.ndarray] = []
        self.scale_cols: list[np.ndarray] = []
        self.nscale = 0  # per-label scale columns (after the G group columns)
        self.column: list[np.ndarray] = []
        self.scale: list[np.ndarray] = []
        self.eps: list[np.ndarray] = []
        self.group: list[np.ndarray] = []

    def columns(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, count: int) -> int:
        """Add ``count`` B columns from triplets (cols local to the block); returns the first index."""
        base = self.ncols
        self.rows.append(rows)
        self.cols.append(base + cols)
        self.vals.append(vals)
        self.ncols += count
        return base

    def scale_column(self, rows: np.ndarray) -> int:
        """A per-label scale column over signature ``rows``; returns its index in E = [A | L]."""
        self.scale_rows.append(rows)
        self.scale_cols.append(np.full(len(rows), self.nscale))
        self.nscale += 1
        return self.G + self.nscale - 1

    def coordinates(self, column: np.ndarray, scale: np.ndarray, eps: float | np.ndarray, group: int) -> None:
        n = len(column)
        self.column.append(np.asarray(column, np.int64))
        self.scale.append(np.broadcast_to(np.asarray(scale, np.int64), (n,)).copy())
        self.eps.append(np.broadcast_to(np.asarray(eps, np.float64), (n,)).copy())
        self.group.append(np.full(n, group, np.int64))

    def finish(self) -> tuple[sp.csr_matrix, sp.csr_matrix | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(B, L, column, scale, eps, group, kept coordinate ids): B columns no signature touches
        are dropped with their coordinates (0 <= eps W whatever q is), unreferenced columns too."""
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        B = sp.csr_matrix((cat(self.vals, np.float64), (cat(self.rows, np.int64), cat(self.cols, np.int64))),
                          shape=(self.S, self.ncols))
        B.eliminate_zeros()
        column, scale, eps, group = (cat(self.column, np.int64), cat(self.scale, np.int64),
                                     cat(self.eps, np.float64), cat(self.group, np.int64))
        touched = np.diff(B.tocsc().indptr) > 0
        kept = np.flatnonzero(touched[column]) if len(column) else np.zeros(0, np.int64)
        used_cols = np.unique(column[kept])
        remap = np.full(self.ncols, -1, np.int64)
        remap[used_cols] = np.arange(len(used_cols))
        B = B[:, used_cols].tocsr()
        L = None
        if self.nscale:
            L = sp.csr_matrix((np.ones(sum(len(r) for r in self.scale_rows)),
                               (cat(self.scale_rows, np.int64), cat(self.scale_cols, np.int64))), shape=(self.S, self.nscale))
            used_scale = np.unique(scale[kept][scale[kept] >= self.G]) - self.G
            scale_map = np.arange(self.G + self.nscale)
            scale_map[self.G + used_scale] = self.G + np.arange(len(used_scale))
            L = L[:, used_scale].tocsr() if len(used_scale) else None
            scale = scale_map[scale]
        return B, L, remap[column[kept]], scale[kept], eps[kept], group[kept], kept


def build_problem(step: M4Balance, stats: CorpusStats, retention: float | None = None,
                  stream=None) -> tuple[MomentProblem, pl.DataFrame, Coordinates, dict[str, Any]]:
    """The compressed problem over signatures; returns it, the key frame and coordinate names."""
    recipe = stats.recipe
    attrs = {a.name: a for a in recipe.attributes}
    label_names = recipe.label_names()
    for name in step.targets:
        if name not in attrs:
            raise ValueError(f"balance.targets names '{name}', which is not an attribute (attributes: {sorted(attrs)})")
    pairs: list[tuple[str, str]] = []
    for a, lab in step.associate:
        if a not in attrs:
            raise ValueError(f"balance.associate pair [{a}, {lab}]: '{a}' is not an attribute (attributes: {sorted(attrs)})")
        if lab in EMBEDDING_LABELS:
            continue
        if lab not in label_names:
            raise ValueError(f"balance.associate pair [{a}, {lab}]: '{lab}' is not a label (labels: {label_names})")
        if (a, lab) not in pairs:
            pairs.append((a, lab))
    embedded = embedding_pairs(step)
    used_attrs = [a.name for a in recipe.attributes
                  if a.name in step.targets or any(p[0] == a.name for p in pairs) or any(p[0] == a.name for p in embedded)]
    used_labels = [lab for lab in label_names if any(p[1] == lab for p in pairs)]

    frame = pl.from_arrow(stats.signatures)
    use_utility = "utility_sum" in frame.columns
    if use_utility:  # the baseline differs between full signatures: key on every tag column
        key_cols = [c for c in frame.columns if c.startswith("tag.")]
    else:
        key_cols = [tag_column(n) for n in used_attrs + used_labels]
        frame = frame.group_by(key_cols).agg(pl.col("count").sum()).sort(key_cols, nulls_last=True)
    frame = frame.filter(pl.col("count") > 0)
    counts = frame["count"].to_numpy().astype(np.float64)
    n = int(counts.sum())
    S = frame.height
    weight = counts / n if n else counts
    eta_target = step.retention if retention is None else retention
    streaming = bool(use_utility and n and step.utility == "sample" and (stream is not None or stats.rows is not None))
    if embedded and n:
        from mmbalance.operators.solve.m4_embedding import row_stream

        stream = row_stream(step, stats, frame.select(key_cols), counts, eta_target, used_attrs, stream)
        streaming = True
        eta = stream.mean_eta()
    elif streaming:
        if stream is None:
            stream = SampleStream(stats.rows, frame.select(key_cols), counts, eta_target, float(step.max_weight))
        else:
            stream = stream.with_retention(eta_target)
        eta = stream.mean_eta()
    elif use_utility and n:
        u = frame["utility_sum"].to_numpy().astype(np.float64) / counts
        mean_u = float(frame["utility_sum"].sum()) / n
        eta = np.clip(eta_target * u / mean_u, 0.0, step.max_weight) if mean_u > 0 else np.full(S, eta_target)
    else:
        eta = np.full(S, min(eta_target, step.max_weight))

    build = _Builder(S, len(used_attrs))
    coords = Coordinates()
    a_cols = []
    hold_cols: list[tuple[np.ndarray, np.ndarray, int]] = []  # (rows, held column, columns) per pair
    notes: dict[str, Any] = {"pi": {}}
    tol = step.tolerance
    for g, name in enumerate(used_attrs):
        values = list(attrs[name].values)
        m = len(values)
        code = _codes(frame[tag_column(name)], values)
        if np.any(code == -2):
            bad = frame[tag_column(name)][int(np.flatnonzero(code == -2)[0])]
            raise ValueError(f"attribute '{name}' has value {bad!r}, not one of its values {values}")
        carrying = np.flatnonzero(code >= 0)
        a_cols.append(carrying)
        carried = np.bincount(code[carrying], weights=counts[carrying], minlength=m)
        if name in step.targets:
            pi = np.array([float(step.targets[name].get(v, 0.0)) for v in values])
            for k, v in enumerate(values):
                if pi[k] > tol.representation and carried[k] == 0:
                    raise ValueError(f"balance.targets.{name}.{v} is {pi[k]} but no row has {name}={v}")
        else:  # association only: hold the attribute at its observed prevalence
            pi = carried / carried.sum() if carried.sum() else np.full(m, 1.0 / m)
        notes["pi"][name] = dict(zip(values, pi.tolist()))
        centred = (code[carrying, None] == np.arange(m)[None, :]) - pi[None, :]  # (carrying, m)
        if name in step.targets:
            base = build.columns(np.repeat(carrying, m), np.tile(np.arange(m), len(carrying)), centred.reshape(-1), m)
            build.coordinates(base + np.arange(m), g, tol.representation, g)
            coords.add("representation", name, values)
        for a_name, lab in pairs:
            if a_name != name:
                continue
            label_values = list(stats.vocab.get(lab, []))
            R = len(label_values)
            label_code = _codes(frame[tag_column(lab)], label_values)
            if np.any(label_code == -2):
                bad = frame[tag_column(lab)][int(np.flatnonzero(label_code == -2)[0])]
                raise ValueError(
                    f"label '{lab}' has value {bad!r}, which is not one of its declared values ({len(label_values)}: "
                    f"{label_values[:5]}{'...' if R > 5 else ''}); add it to the label's values or remove values: to use every value seen")
            y = label_code[carrying]
            has = y >= 0
            pair_centred = centred
            if step.hold_labels and name not in step.targets:
                # Kamiran-Calders: prevalence among rows carrying both the attribute and the label,
                # so that KL + hold_labels at eps = 0 is reweighing even with null labels
                both = np.bincount(code[carrying][has], weights=counts[carrying][has], minlength=m)
                pair_pi = both / both.sum() if both.sum() else pi
                notes.setdefault("pi_by_pair", {})[f"{name} x {lab}"] = dict(zip(values, pair_pi.tolist()))
                pair_centred = (code[carrying, None] == np.arange(m)[None, :]) - pair_pi[None, :]
            rows_has = np.repeat(carrying[has], m)
            base = build.columns(rows_has, (np.arange(m)[None, :] * R + y[has, None]).reshape(-1),
                                 pair_centred[has].reshape(-1), m * R)
            if tol.association is not None:
                build.coordinates(base + np.arange(m * R), g, tol.association, g)
                coords.add("association", name, values, lab, label_values)
            if tol.association_per_label is not None:
                _per_label(build, coords, notes, step, g, name, values, lab, label_values, carrying[has], y[has],
                           pair_centred[has], counts[carrying][has], base)
            if step.hold_labels:  # each label value's mass among the rows carrying the attribute
                present, column = np.unique(y[has], return_inverse=True)
                hold_cols.append((carrying[has], column.reshape(-1), len(present)))
    B, L, column, scale, eps, group, kept = build.finish()
    A = sp.csr_matrix(
        (np.ones(sum(len(c) for c in a_cols)), (np.concatenate(a_cols) if a_cols else np.zeros(0, np.int64),
         np.concatenate([np.full(len(c), g) for g, c in enumerate(a_cols)]) if a_cols else np.zeros(0, np.int64))),
        shape=(S, len(used_attrs)),
    )
    H = hold_target = None
    if hold_cols:
        offsets = np.cumsum([0] + [c[2] for c in hold_cols])
        H = sp.csr_matrix(
            (np.ones(sum(len(c[0]) for c in hold_cols)),
             (np.concatenate([c[0] for c in hold_cols]), np.concatenate([c[1] + o for c, o in zip(hold_cols, offsets)]))),
            shape=(S, int(offsets[-1])),
        )
        # held at the baseline: the mass the rows would have at their baseline keep rate
        hold_target = H.T @ (weight * eta)
    coords.keep(kept)
    problem = MomentProblem(
        H=H, hold_target=hold_target, weight=weight, rows=n, eta=eta, B=B, A=A, group=group, eps=eps,
        max_weight=float(step.max_weight), budget=float(eta_target) if step.budget else None, objective=step.objective,
        stream=stream if streaming else None, column=column, scale=scale, L=L,
    )
    if embedded and n:
        from mmbalance.operators.solve.m4_embedding import add_embedding_coordinates

        add_embedding_coordinates(problem, coords, stream, notes, used_attrs, step)
    if streaming:
        notes["utility"] = "per row (streaming: one pass over the rows per dual evaluation)"
    else:
        notes["utility"] = "per-signature mean (utility_sum / count)" if use_utility else None
    return problem, frame.select(key_cols), coords, notes


def _per_label(build: _Builder, coords: Coordinates, notes: dict[str, Any], step: M4Balance, g: int, name: str,
               values: list[str], lab: str, label_values: list[str], rows: np.ndarray, y: np.ndarray,
               centred: np.ndarray, counts: np.ndarray, base: int) -> None:
    """Per-label parity of [name, lab]: |E_w[(s_v - pi_v) y_j]| <= eps E_w[y_j] for every value j
    with at least ``min_support`` carrying rows (B columns shared with the global bound), and one
    pooled bound over the smaller values."""
    m, R = len(values), len(label_values)
    support = np.bincount(y, weights=counts, minlength=R)
    big = np.flatnonzero(support >= step.min_support)
    small = np.flatnonzero((support > 0) & (support < step.min_support))
    eps = step.tolerance.association_per_label
    scale_of = np.zeros(R, np.int64)
    for r in big:
        scale_of[r] = build.scale_column(rows[y == r])
    if len(big):
        cols = (np.arange(m)[:, None] * R + big[None, :]).reshape(-1)  # value-major, as coordinates name them
        build.coordinates(base + cols, np.tile(scale_of[big], m), eps, g)
        coords.add("association_per_label", name, values, lab, [label_values[r] for r in big])
    pooled_values = [label_values[r] for r in small]
    if len(small):
        inside = np.isin(y, small)
        pooled = build.columns(np.repeat(rows[inside], m), np.tile(np.arange(m), int(inside.sum())),
                               centred[inside].reshape(-1), m)
        build.coordinates(pooled + np.arange(m), build.scale_column(rows[inside]), eps, g)
        coords.add("association_per_label", name, values, lab, [f"<{len(small)} pooled values>"])
    notes.setdefault("per_label", {})[f"{name} x {lab}"] = {
        "min_support": step.min_support, "bounded_values": int(len(big)), "pooled_values": pooled_values,
        "pooled_rows": float(support[small].sum()), "tolerance": eps,
    }
