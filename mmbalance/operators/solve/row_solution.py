"""The solution of M4 with embedding moments (docs/algorithms.md section 8): a weight per row.

q_i = clip(eta_i - t_s(i) - z_i . C_c(i), 0, Q) (L2) or min(eta_i exp(-...), Q) (KL), times the
earlier balance steps' weight when the step came last in a composition: t per signature and C per
class (the tuple of attribute values) from the solved duals, z_i the row's embedding projected on
the principal components the solution carries. The same arithmetic as the solve's row blocks
(``m4_rows``), so the weigh stage reproduces the solved weights from the same rows. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.pca import PcaBasis
from mmbalance.operators.solve import LookupSolution, solution_from_dict
from mmbalance.operators.solve.m4_stream import baselines, row_terms
from mmbalance.schemas.contract import tag_column

SAMPLE_COLUMNS = {"image": "image_emb", "text": "text_emb"}  # embedding columns as the fit sample (and weigh) name them


@dataclass
class RowMomentSolution:
    method: str
    key_columns: list[str]
    keys: dict[str, list[str | None]]
    t: list[float]  # per signature
    retention: float
    mean_utility: float
    max_weight: float
    objective: str
    utility_column: str | None
    attributes: list[list[Any]]  # [name, values] of the attributes that make a class, in order
    class_codes: list[list[int]]  # (classes, attributes) value index, -1 = null
    class_shift: list[list[float]]  # (classes, ktot) C
    bases: list[dict[str, Any]]  # PcaBasis.to_dict() per side, in z's column order
    families: list[dict[str, Any]]  # [attribute, embedding.side] pairs: attribute, side, values, pi, sd
    prior: dict[str, Any] | None = None  # the earlier steps' LookupSolution
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._bases = [PcaBasis.from_dict(b) for b in self.bases]
        codes = np.asarray(self.class_codes, np.int64).reshape(len(self.class_codes), len(self.attributes))
        self._radix = np.array([len(values) + 1 for _, values in self.attributes], np.int64)
        self._class_ids = self._ids(codes)
        self._shift = np.asarray(self.class_shift, np.float64).reshape(len(self.class_codes), -1)

    def _ids(self, codes: np.ndarray) -> np.ndarray:
        return ((codes + 1) * np.concatenate([[1], np.cumprod(self._radix[:-1])])).sum(axis=1)

    @property
    def embedding_sides(self) -> list[PcaBasis]:
        return self._bases

    def attribute_codes(self, tags: pa.Table) -> np.ndarray:
        cols = []
        for name, values in self.attributes:
            arr = tags.column(tag_column(name))
            cols.append(pc.fill_null(pc.index_in(arr, value_set=pa.array(values, pa.string())), -1).to_numpy(zero_copy_only=False))
        return np.column_stack(cols).astype(np.int64) if cols else np.zeros((tags.num_rows, 0), np.int64)

    def project(self, tags: pa.Table) -> np.ndarray:
        """z of each row from the table's embedding columns (``image_emb`` / ``text_emb``)."""
        from mmbalance.operators.arrays import embedding_matrix

        parts = [b.project(*embedding_matrix(tags.column(SAMPLE_COLUMNS[b.side]))) for b in self._bases]
        return np.concatenate(parts, axis=1) if parts else np.zeros((tags.num_rows, 0), np.float32)

    def weights(self, tags: pa.Table, projected: np.ndarray | None = None) -> np.ndarray:
        z = self.project(tags) if projected is None else projected
        t = LookupSolution(self.method, self.key_columns, self.keys, self.t).weights(tags)
        ids = self._ids(self.attribute_codes(tags))
        order = np.argsort(self._class_ids)
        at = np.clip(np.searchsorted(self._class_ids, ids, sorter=order), 0, len(order) - 1)
        cls = order[at]
        known = self._class_ids[cls] == ids
        if not known.all():  # every kept row's class is a signature's: anything else is a broken join
            raise ValueError(f"solution '{self.method}': a row's attribute values are not among the solved classes")
        shift = t + np.einsum("ij,ij->i", z.astype(np.float64), self._shift[cls])
        if self.utility_column:
            u = np.asarray(tags.column(self.utility_column).to_numpy(zero_copy_only=False), np.float64)
        else:
            u = np.ones(tags.num_rows)
        params = {"max_weight": self.max_weight, "mean_u": self.mean_utility, "retention": self.retention}
        q = row_terms(baselines(u, params), shift, self.objective, self.max_weight)[0]
        return q * solution_from_dict(self.prior).weights(tags) if self.prior else q

    def embedding_sums(self, tags: pa.Table, z: np.ndarray, weights: np.ndarray, repeats: np.ndarray) -> dict[str, Any]:
        """Per [attribute, embedding] pair and attribute value: sum of z and of the row count,
        weight and repeats (before, expected, realized): summed over shards, the report's exact
        embedding moments."""
        codes = self.attribute_codes(tags)
        names = [name for name, _ in self.attributes]
        offsets, at = {}, 0
        for b in self._bases:
            offsets[b.side] = (at, b.k)
            at += b.k
        out: dict[str, Any] = {}
        views = {"before": np.ones(len(weights)), "after_expected": np.asarray(weights, np.float64),
                 "after_realized": np.asarray(repeats, np.float64)}
        for fam in self.families:
            u = codes[:, names.index(fam["attribute"])]
            lo, k = offsets[fam["side"]]
            zf = z[:, lo : lo + k].astype(np.float64)
            entry: dict[str, Any] = {"z": {}, "mass": {}}
            for view, x in views.items():
                entry["z"][view] = [(x[u == v] @ zf[u == v]).tolist() for v in range(len(fam["values"]))]
                entry["mass"][view] = [float(x[u == v].sum()) for v in range(len(fam["values"]))]
            out[f"{fam['attribute']} x embedding.{fam['side']}"] = entry
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "row_moments", **{k: getattr(self, k) for k in (
            "method", "key_columns", "keys", "t", "retention", "mean_utility", "max_weight", "objective", "utility_column",
            "attributes", "class_codes", "class_shift", "bases", "families", "prior", "diagnostics")}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RowMomentSolution":
        return cls(**{k: v for k, v in data.items() if k != "kind"})


def merge_embedding_sums(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Shard summaries' ``embedding_sums`` added up (a fixed order: the same sums on every rerun)."""
    total: dict[str, Any] = {}
    for part in parts:
        for family, entry in (part or {}).items():
            into = total.setdefault(family, {"z": {}, "mass": {}})
            for key in ("z", "mass"):
                for view, value in entry[key].items():
                    prev = into[key].get(view)
                    into[key][view] = (np.asarray(value) if prev is None else np.asarray(prev) + np.asarray(value)).tolist()
    return total
