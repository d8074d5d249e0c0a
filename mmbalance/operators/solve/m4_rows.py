"""Row blocks for M4 with embedding moments (docs/algorithms.md section 8): what one pass sums.

A block is one shard's kept rows: signature id, utility, prior weight omega (earlier balance
steps; 1 without), the class (the tuple of attribute values, which the signature fixes) and z,
the embedding projected on its principal components (float32). For dual shifts t per signature
and C per class, row i's shift is t_s(i) + z_i . C_c(i) and its weight the closed form of
``m4_stream.row_terms``. One pass returns, in one packed vector, what the dual's value, gradient
and Newton system need, so the number of passes is the number of dual evaluations:

    per signature   sum omega q, sum omega f, sum omega dq/dt, sum omega q^2       (4 x S)
    per class       sum omega q z (gradient), sum omega dq/dt z                      (2 x classes x k)
                    sum omega dq/dt z z'  (the embedding block of the Hessian)       (classes x k x k)
    per watched     sum over rows of N_sr omega dq/dt z, per value of each embedded   (values x R_w x k)
    shift row r     attribute (the Hessian block between signature and embedding duals)

numpy and scipy.sparse only: a Ray worker reducing a block does not load the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.operators.pca import PcaBasis
from mmbalance.operators.solve.m4_stream import baselines, row_terms, signature_ids, worst_terms

CHUNK = 65_536  # rows per step inside a block: bounds a worker's float64 copies


@dataclass
class RowSpec:
    """What a block holds besides tags: the projections, the class of each signature, the prior."""

    bases: list[PcaBasis]  # one per embedding side, in z's column order
    class_of_sig: np.ndarray  # (S,) class of each signature
    utility: bool = False  # the rows carry the utility column
    prior: dict[str, Any] | None = None  # LookupSolution.to_dict() of the earlier steps' weights
    sample_columns: dict[str, str] = field(default_factory=lambda: {"image": "image_emb", "text": "text_emb"})

    @property
    def ktot(self) -> int:
        return sum(b.k for b in self.bases)

    def columns(self, keys) -> list[str]:
        from mmbalance.schemas.contract import UTILITY_COLUMN

        cols = list(keys.columns) + ([UTILITY_COLUMN] if self.utility else [])
        cols += [self.sample_columns[b.side] for b in self.bases]
        cols += list(self.prior["key_columns"]) if self.prior else []
        return list(dict.fromkeys(cols))

    def to_files(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able part, arrays) for a worker that builds blocks elsewhere."""
        return ({"bases": [b.to_dict() for b in self.bases], "utility": self.utility, "prior": self.prior,
                 "sample_columns": self.sample_columns}, {"class_of_sig": self.class_of_sig})

    @classmethod
    def from_files(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "RowSpec":
        return cls([PcaBasis.from_dict(b) for b in meta["bases"]], arrays["class_of_sig"], meta["utility"], meta["prior"],
                   meta["sample_columns"])


def table_embeddings(table: pa.Table, spec: RowSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Embedding matrices by side from a table's sample-named embedding columns."""
    from mmbalance.operators.arrays import embedding_matrix

    return {b.side: embedding_matrix(table.column(spec.sample_columns[b.side])) for b in spec.bases}


def project_sides(spec_bases: list[PcaBasis], embeddings: dict[str, tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """z (n, ktot) float32: every side's projection, side by side."""
    parts = [b.project(*embeddings[b.side]) for b in spec_bases]
    return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)


def row_block(table: pa.Table, keys, spec: RowSpec, embeddings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
              z: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One block's arrays from a table of kept rows (tags, utility) and their embeddings (or z)."""
    from mmbalance.operators.solve import solution_from_dict
    from mmbalance.schemas.contract import UTILITY_COLUMN

    sig, u = signature_ids(table.select(list(keys.columns) + ([UTILITY_COLUMN] if spec.utility else [])), keys)
    if z is None:
        z = project_sides(spec.bases, embeddings or {}, table.num_rows)
    omega = solution_from_dict(spec.prior).weights(table) if spec.prior else np.ones(table.num_rows)
    return {"sig": sig, "u": u, "z": np.ascontiguousarray(z, np.float32), "omega": np.asarray(omega, np.float64),
            "cls": np.asarray(spec.class_of_sig, np.int32)[sig]}


def block_totals(block: dict[str, np.ndarray]) -> dict[str, float]:
    omega = block["omega"]
    return {"rows": int(len(omega)), "sum_u": float(block["u"].sum()), "sum_omega": float(omega.sum()),
            "sum_omega_u": float(omega @ block["u"])}


def _layout(params: dict[str, Any], watched: int) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """Offsets of each part of a packed ``aggregate`` vector."""
    S, C, k = int(params["S"]), int(params["classes"]), int(params["ktot"])
    values = sum(m for _, m in params["embedded_groups"])
    shapes = {"q": (S,), "f": (S,), "curv": (S,), "q2": (S,), "qz": (C, k), "dz": (C, k), "zz": (C, k, k),
              "cross": (values, watched, k)}
    out, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = (start, start + size, shape)
        start += size
    return out


def unpack(vector: np.ndarray, params: dict[str, Any], watched: int) -> dict[str, np.ndarray]:
    return {name: vector[a:b].reshape(shape) for name, (a, b, shape) in _layout(params, watched).items()}


def row_block_sums(block: dict[str, np.ndarray], kind: str, payload, params: dict[str, Any]) -> np.ndarray:
    """One block's packed sums for one pass (see the module docstring). ``eta``: per-signature
    omega eta, then per-class omega z (the moments at weight 1); ``worst``: per-signature omega
    times the largest objective term; ``aggregate``: the packed vector of ``_layout``; ``cross``:
    only its watched-rows block (a Hessian block the last pass did not cover)."""
    import scipy.sparse as sp

    S, Q, objective = int(params["S"]), float(params["max_weight"]), params["objective"]
    classes, ktot = int(params["classes"]), int(params["ktot"])
    sig, z, omega, cls = block["sig"], block["z"], block["omega"], block["cls"]
    eta = baselines(block["u"], params)
    if kind == "eta":
        zsum = np.zeros((classes, ktot))
        for c in np.unique(cls):
            rows = cls == c
            zsum[c] = omega[rows] @ z[rows].astype(np.float64)
        return np.concatenate([np.bincount(sig, weights=omega * eta, minlength=S), zsum.ravel()])
    if kind == "worst":
        return np.bincount(sig, weights=omega * worst_terms(eta, objective, Q), minlength=S)
    t, C = payload["t"], payload["C"]
    watched = sp.csr_matrix((payload["w_data"], payload["w_indices"], payload["w_indptr"]), shape=(S, int(payload["w_count"])))
    codes = np.asarray(params["class_codes"], np.int64).reshape(classes, -1)
    groups = params["embedded_groups"]  # (group, values) of the attributes with embedding moments
    needed = np.asarray(params["class_needed"], bool)
    layout = _layout(params, watched.shape[1])
    out = np.zeros(layout["cross"][1])
    part = {name: out[a:b].reshape(shape) for name, (a, b, shape) in layout.items()}
    for start in range(0, len(sig), CHUNK):
        s_c, c_c, w_c = sig[start : start + CHUNK], cls[start : start + CHUNK], omega[start : start + CHUNK]
        z32 = z[start : start + CHUNK]
        zf = z32.astype(np.float64)
        shift = t[s_c] + np.einsum("ij,ij->i", zf, C[c_c])
        q, f, curv = row_terms(eta[start : start + CHUNK], shift, objective, Q)
        wd = w_c * curv
        if kind == "aggregate":
            wq = w_c * q
            for name, x in (("q", wq), ("f", w_c * f), ("curv", wd), ("q2", wq * q)):
                part[name] += np.bincount(s_c, weights=x, minlength=S)
            for c in np.unique(c_c):
                rows = c_c == c
                part["qz"][c] += wq[rows] @ zf[rows]
                part["dz"][c] += wd[rows] @ zf[rows]
                if needed[c]:
                    y = z32[rows] * np.sqrt(wd[rows]).astype(np.float32)[:, None]
                    part["zz"][c] += (y.T @ y).astype(np.float64)  # float32 product: a Hessian block, not a moment
        if watched.shape[1]:
            dz = wd[:, None] * zf
            at = 0
            for g, m in groups:
                u = codes[c_c, g]
                for v in range(m):
                    rows = np.flatnonzero(u == v)
                    if len(rows):
                        part["cross"][at + v] += np.asarray(watched[s_c[rows]].T @ dz[rows])
                at += m
    if kind == "cross":
        return out[layout["cross"][0] :]
    return out
