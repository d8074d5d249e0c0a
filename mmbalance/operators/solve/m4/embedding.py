"""M4 embedding moments (docs/algorithms.md section 8): the coordinates and the row blocks they need.

For an [attribute, embedding.<side>] pair with principal components z_k (fitted on the sample,
``operators/pca.py``) the coordinates are |E_w[(s_v - pi_v) z_k]| <= eps sd(z_k) E_w[carrying], one
per attribute value v and component k. Rows are not compressible into signatures, so every dual
evaluation is one pass over the row blocks (``rows``): row i's shift is t_s(i) + z_i . C_c(i),
with t the signature part of N T x and C = reshape(Mz' s_z) per class (the tuple of attribute
values), Mz mapping the per-class sums of omega q z to the embedding moments. The dual over rows is
``row_dual.RowDual``; the largest feasible retention, the warm start and the solution ``row_primal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from mmbalance.operators.pca import PcaBasis
from mmbalance.operators.solve.m4.problem import Coordinates, MomentProblem
from mmbalance.operators.solve.m4.problem import codes as codes_of
from mmbalance.operators.solve.m4.rows import RowSpec, block_totals, finish_block, unpack
from mmbalance.operators.solve.m4.stream import LocalBlocks, reduce_block
from mmbalance.schemas.balance import M4Balance, embedding_pairs
from mmbalance.schemas.contract import tag_column



@dataclass
class Family:
    attribute: str
    group: int  # attribute group (index into the problem's A columns)
    side: str
    values: list[str]
    pi: np.ndarray  # (m,)
    k: int  # components
    offset: int  # first column of this side in z
    start: int  # first embedding coordinate: (v, k) is start + v * k + k_index
    sd: np.ndarray  # (k,)


@dataclass
class EmbeddingMoments:
    families: list[Family]
    class_codes: np.ndarray  # (classes, G) attribute codes of each class, -1 = null
    Mz: sp.csr_matrix  # (Kz, classes * ktot): embedding moments = Mz @ vec(per-class sums of omega q z)
    ktot: int
    size: int  # Kz
    attributes: list[list[Any]]  # [name, values] of the attributes that make a class, in order


class RowMomentStream:
    """The row blocks and what a pass needs; stands in for ``SampleStream`` as ``MomentProblem.stream``."""

    def __init__(self, blocks, counts: np.ndarray, spec: RowSpec, totals: dict[str, float], class_codes: np.ndarray,
                 retention: float, max_weight: float):
        self.blocks, self.counts, self.spec = blocks, counts, spec
        self.S = len(counts)
        self.rows = int(totals["rows"])
        self.mean_u = totals["sum_omega_u"] / totals["sum_omega"] if totals["sum_omega"] else 0.0
        self.class_codes = class_codes
        self.retention, self.max_weight = retention, max_weight
        self.embedded_groups: list[tuple[int, int]] = []
        self.class_needed = np.zeros(len(class_codes), bool)
        self.zsum_before: np.ndarray | None = None
        self.passes = 0

    def with_retention(self, retention: float) -> "RowMomentStream":
        clone = object.__new__(RowMomentStream)
        clone.__dict__.update(self.__dict__)
        clone.retention = retention
        return clone

    def params(self, objective: str) -> dict[str, Any]:
        return {"S": self.S, "max_weight": self.max_weight, "objective": objective, "mean_u": self.mean_u,
                "retention": self.retention, "classes": len(self.class_codes), "ktot": self.spec.ktot,
                "class_codes": self.class_codes.ravel().tolist(), "embedded_groups": [list(g) for g in self.embedded_groups],
                "class_needed": self.class_needed.tolist()}

    def per_signature(self, total: np.ndarray) -> np.ndarray:
        """Per-signature sums as means over the signature's rows (their prior weight)."""
        return np.divide(total, self.counts, out=np.zeros(self.S), where=self.counts > 0)

    def mean_eta(self) -> np.ndarray:
        out = self.blocks.reduce("eta", None, self.params("l2"))
        self.zsum_before = out[self.S :].reshape(len(self.class_codes), self.spec.ktot)
        return self.per_signature(out[: self.S])

    def worst(self, objective: str) -> np.ndarray:
        return self.per_signature(self.blocks.reduce("worst", None, self.params(objective)))

    def run_pass(self, kind: str, t: np.ndarray, C: np.ndarray, watched: sp.csr_matrix, objective: str) -> dict[str, np.ndarray]:
        self.passes += 1
        payload = {"t": np.asarray(t, np.float64), "C": np.asarray(C, np.float64), "w_data": watched.data,
                   "w_indices": watched.indices, "w_indptr": watched.indptr, "w_count": np.array(watched.shape[1])}
        params = self.params(objective)
        out = self.blocks.reduce(kind, payload, params)
        if kind == "cross":
            return {"cross": out.reshape(-1, watched.shape[1], self.spec.ktot)}
        return unpack(out, params, watched.shape[1])

    def subsample(self, rows: int) -> "RowMomentStream":
        """Every k-th row of every block, in memory (a starting point for the full passes)."""
        step = max(1, -(-self.rows // rows))
        parts = [{k: np.asarray(b[k])[::step] for k in ("sig", "u", "z", "omega", "cls")} for b in self.blocks.iter_blocks()]
        block = finish_block({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
        counts = np.bincount(block["sig"], weights=block["omega"], minlength=self.S)
        sub = RowMomentStream(MemoryBlocks(block), counts, self.spec, block_totals(block), self.class_codes,
                              self.retention, self.max_weight)
        sub.embedded_groups, sub.class_needed = self.embedded_groups, self.class_needed
        return sub

    def close(self) -> None:
        self.blocks.close()


class MemoryBlocks:
    """One block held in memory (a subsample of the rows)."""

    def __init__(self, block: dict[str, np.ndarray]):
        self.block = block

    def iter_blocks(self):
        yield self.block

    def reduce(self, kind: str, payload, params: dict[str, Any]) -> np.ndarray:
        return reduce_block(self.block, kind, payload, params)

    def close(self) -> None:
        pass


def row_stream(step: M4Balance, stats, keys, counts: np.ndarray, retention: float, used_attrs: list[str],
               stream: RowMomentStream | None) -> RowMomentStream:
    """The row blocks of an M4 step with embedding moments (built once; a new retention reuses them)."""
    if stream is not None:
        return stream.with_retention(retention)
    if stats.rows is None:
        raise ValueError("balance.associate: embedding moments are solved over every row, which this input "
                         "does not stream (use the pipeline, or give CorpusStats the rows)")
    bases = []
    for side in dict.fromkeys(side for _, side in embedding_pairs(step)):
        basis = (stats.embedding_bases or {}).get(side)
        if basis is None:
            raise ValueError(f"balance.associate names embedding.{side} but no principal components of the {side} "
                             "embeddings were fitted (the fit stage fits them on the sample)")
        k = min(basis.k, step.embedding_components)
        bases.append(PcaBasis(basis.side, basis.mean, basis.components[:k], basis.sd[:k], basis.meta))
    attrs = {a.name: a for a in stats.recipe.attributes}
    codes = np.column_stack([codes_of(keys[tag_column(a)], list(attrs[a].values)) for a in used_attrs])
    radix = np.array([len(attrs[a].values) + 1 for a in used_attrs], np.int64)
    ids = ((codes + 1) * np.concatenate([[1], np.cumprod(radix[:-1])])).sum(axis=1)
    present, class_of_sig = np.unique(ids, return_inverse=True)
    first = np.zeros(len(present), np.int64)
    first[class_of_sig[::-1]] = np.arange(len(ids))[::-1]  # the first signature of each class
    class_codes = codes[first]
    spec = RowSpec(bases, class_of_sig.astype(np.int32), utility="utility_sum" in stats.signatures.column_names,
                   prior=stats.prior.to_dict() if getattr(stats, "prior", None) is not None else None)
    blocks = stats.rows.blocks() if hasattr(stats.rows, "blocks") else LocalBlocks(stats.rows)
    totals = blocks.build_rows(keys, spec)
    return RowMomentStream(blocks, counts, spec, totals, class_codes, retention, float(step.max_weight))


def add_embedding_coordinates(problem: MomentProblem, coords: Coordinates, stream: RowMomentStream,
                              notes: dict[str, Any], used_attrs: list[str], step: M4Balance) -> None:
    """Append the embedding coordinates (v, k) of each [attribute, embedding.side] pair."""
    offsets, at = {}, 0
    for basis in stream.spec.bases:
        offsets[basis.side] = (at, basis)
        at += basis.k
    classes, ktot = len(stream.class_codes), stream.spec.ktot
    families: list[Family] = []
    start = 0
    for attribute, side in embedding_pairs(step):
        g = used_attrs.index(attribute)
        values = list(notes["pi"][attribute])
        pi = np.array([notes["pi"][attribute][v] for v in values])
        offset, basis = offsets[side]
        families.append(Family(attribute, g, side, values, pi, basis.k, offset, start, basis.sd))
        start += len(values) * basis.k
    rows, cols, vals = [], [], []
    for fam in families:
        u = stream.class_codes[:, fam.group]
        for c in np.flatnonzero(u >= 0):
            coef = (np.arange(len(fam.values)) == u[c]) - fam.pi  # (s_v - pi_v) of the class's rows
            for v in range(len(fam.values)):
                rows.append(fam.start + v * fam.k + np.arange(fam.k))
                cols.append(c * ktot + fam.offset + np.arange(fam.k))
                vals.append(np.full(fam.k, coef[v]))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    Mz = sp.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))), shape=(start, classes * ktot))
    first = problem.Kb + problem.P + problem.holds + 1
    eps = np.concatenate([np.tile(step.tolerance.association_embedding * fam.sd, len(fam.values)) for fam in families])
    group = np.concatenate([np.full(len(fam.values) * fam.k, fam.group) for fam in families])
    problem.column = np.concatenate([problem.column, first + np.arange(start)])
    problem.scale = np.concatenate([problem.scale, group])
    problem.group = np.concatenate([problem.group, group])
    problem.eps = np.concatenate([problem.eps, eps])
    old = coords.size
    for fam in families:
        coords.add("embedding", fam.attribute, fam.values, f"embedding.{fam.side}", [f"pc{i + 1}" for i in range(fam.k)])
    if coords.kept is not None:
        coords.kept = np.concatenate([coords.kept, np.arange(old, coords.size)])
    attributes = [[a, list(notes["pi"][a])] for a in used_attrs]
    problem.embedding = EmbeddingMoments(families, stream.class_codes, Mz, ktot, start, attributes)
    stream.embedded_groups = list(dict.fromkeys((fam.group, len(fam.values)) for fam in families))
    stream.class_needed = np.zeros(classes, bool)
    for fam in families:
        stream.class_needed |= stream.class_codes[:, fam.group] >= 0
    notes["embedding"] = {"families": [
        {"attribute": fam.attribute, "side": fam.side, "values": fam.values, "pi": fam.pi.tolist(), "components": fam.k,
         "tolerance": step.tolerance.association_embedding, "constraints": len(fam.values) * fam.k, "sd": fam.sd.tolist()}
        for fam in families]}
