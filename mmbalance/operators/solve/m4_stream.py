"""The M4 streaming path's row blocks (docs/algorithms.md sections 1 and 8): every row keeps its own weight.

A pass over the kept rows stores each shard's rows as a block (signature id and utility; for
embedding moments also the projected embedding and a prior weight); every dual evaluation is then
a map over the blocks and a fixed-order sum. numpy and polars only: a Ray worker reducing a block,
or applying a per-row solution, does not load the solver.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl


def baselines(u: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """eta_i = clip(retention u_i / mean(u), 0, Q) (a constant without utility)."""
    Q, mean_u, retention = float(params["max_weight"]), float(params["mean_u"]), float(params["retention"])
    return np.clip(retention * u / mean_u, 0.0, Q) if mean_u > 0 else np.full(len(u), min(retention, Q))


def worst_terms(eta: np.ndarray, objective: str, Q: float) -> np.ndarray:
    """The largest objective term each row can have on [0, Q]."""
    if objective == "l2":
        return 0.5 * np.maximum(eta, Q - eta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        at_q = np.where(eta > 0, Q * (math.log(Q) - np.log(eta)) - Q + eta, 0.0)
    return np.maximum(eta, at_q)


def row_terms(eta: np.ndarray, t: np.ndarray, objective: str, Q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, the objective term f(q) and -dq/dt per row at dual shifts ``t``: the closed-form minimiser
    clip(eta - t, 0, Q) (L2) or min(eta exp(-t), Q) (KL)."""
    if objective == "l2":
        z = eta - t
        q = np.clip(z, 0.0, Q)
        return q, 0.5 * (q - eta) ** 2, ((z > 0.0) & (z < Q)).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_eta = np.log(eta)
    logq = np.minimum(log_eta - t, math.log(Q))
    q = np.exp(logq)
    with np.errstate(invalid="ignore"):
        f = np.where(q > 0, q * (logq - log_eta), 0.0) - q + eta
    return q, f, np.where(log_eta - t < math.log(Q), q, 0.0)


def block_sums(sig: np.ndarray, u: np.ndarray, kind: str, t: np.ndarray | None, params: dict[str, Any]) -> np.ndarray:
    """Per-signature sums over one block of rows (signature id, utility): ``eta`` (1, S) the
    baselines, ``worst`` (1, S) the largest objective term on [0, Q], ``aggregate`` (3, S) q, f and
    -dq/dt at dual shifts ``t``. Summing the blocks' results gives the corpus's."""
    S, Q, objective = int(params["S"]), float(params["max_weight"]), params["objective"]
    eta = baselines(u, params)
    if kind == "eta":
        return np.bincount(sig, weights=eta, minlength=S)[None, :]
    if kind == "worst":
        return np.bincount(sig, weights=worst_terms(eta, objective, Q), minlength=S)[None, :]
    terms = row_terms(eta, t[sig], objective, Q)
    return np.stack([np.bincount(sig, weights=x, minlength=S) for x in terms])


def reduce_block(block: dict[str, np.ndarray], kind: str, payload, params: dict[str, Any]) -> np.ndarray:
    """One block's sums for one pass: per-signature sums (``block_sums``), or, for a block with
    projected embeddings, the row path's packed sums (``m4_rows.row_block_sums``)."""
    if "z" in block:
        from mmbalance.operators.solve.m4_rows import row_block_sums

        return row_block_sums(block, kind, payload, params)
    t = payload.get("t") if isinstance(payload, dict) else payload
    return block_sums(block["sig"], block["u"], kind, t, params)


def signature_ids(table, keys: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(signature id, utility) of a table of kept rows, by their tag columns (utility 1 without one)."""
    from mmbalance.schemas.contract import UTILITY_COLUMN

    frame = pl.from_arrow(table)
    keyed = keys.with_row_index("__sig")
    sig = frame.select(keys.columns).join(keyed, on=keys.columns, how="left", nulls_equal=True, maintain_order="left")["__sig"]
    if sig.null_count():
        raise RuntimeError("m4 streaming: a row's tags are not in the signature table")
    u = frame[UTILITY_COLUMN].to_numpy().astype(np.float64) if UTILITY_COLUMN in frame.columns else np.ones(frame.height)
    return sig.to_numpy().astype(np.int32), u


class LocalBlocks:
    """Row blocks on this machine's disk, reduced in this process: for a RowStream that cannot run
    the reductions itself (the pipeline's can: one Ray task per shard per dual evaluation)."""

    def __init__(self, rows):
        self.rows_stream = rows
        self.dir: str | None = None
        self.files: list[str] = []

    def _new_dir(self) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="mmbalance-m4-stream-")

    def build(self, keys: pl.DataFrame) -> tuple[int, float]:
        from mmbalance.schemas.contract import UTILITY_COLUMN

        self._new_dir()
        n, total_u = 0, 0.0
        for i, table in enumerate(self.rows_stream.tables(keys.columns + [UTILITY_COLUMN])):
            sig, u = signature_ids(table, keys)
            path = f"{self.dir}/{i:06d}.npz"
            np.savez(path, sig=sig, u=u)
            self.files.append(path)
            n, total_u = n + len(u), total_u + float(u.sum())
        return n, total_u

    def build_rows(self, keys: pl.DataFrame, spec) -> dict[str, float]:
        """Row blocks with projected embeddings (``m4_rows.RowSpec``) from tables that carry the
        embedding columns; returns the blocks' totals (``m4_rows.block_totals``)."""
        from mmbalance.operators.solve.m4_rows import block_totals, row_block, table_embeddings

        self._new_dir()
        totals: list[dict[str, float]] = []
        for i, table in enumerate(self.rows_stream.tables(spec.columns(keys))):
            block = row_block(table, keys, spec, table_embeddings(table, spec))
            path = f"{self.dir}/{i:06d}.npz"
            np.savez(path, **block)
            self.files.append(path)
            totals.append(block_totals(block))
        return {k: sum(t[k] for t in totals) for k in ("rows", "sum_u", "sum_omega", "sum_omega_u")} if totals else \
            {"rows": 0, "sum_u": 0.0, "sum_omega": 0.0, "sum_omega_u": 0.0}

    def iter_blocks(self):
        for path in self.files:
            with np.load(path) as data:
                yield {k: data[k] for k in data.files}

    def reduce(self, kind: str, t, params: dict[str, Any]) -> np.ndarray:
        total = None
        for block in self.iter_blocks():
            part = reduce_block(block, kind, t, params)
            total = part if total is None else total + part
        return total if total is not None else np.zeros((3 if kind == "aggregate" else 1, int(params["S"])))

    def close(self) -> None:
        import shutil

        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class SampleStream:
    """The streaming path: every row keeps its own baseline eta_i = clip(retention u_i / mean u, 0, Q).

    One pass over the kept rows stores (signature id, utility) per shard as blocks (12 bytes a row);
    each dual evaluation is then a map-reduce over the blocks (``block_sums``), one block in memory
    at a time: q, f and the curvature come back as per-signature sums, so the dual still has 2K+1
    variables. The RowStream may supply its own blocks (``blocks()``), e.g. one Ray task per shard.
    """

    def __init__(self, rows, keys: pl.DataFrame, counts: np.ndarray, retention: float, max_weight: float):
        self.blocks = rows.blocks() if hasattr(rows, "blocks") else LocalBlocks(rows)
        self.counts = counts
        self.S = len(counts)
        n, total_u = self.blocks.build(keys)
        self.rows = n
        self.mean_u = total_u / n if n else 0.0
        self.retention = retention
        self.max_weight = max_weight

    def with_retention(self, retention: float) -> "SampleStream":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.retention = retention
        return clone

    def _params(self, objective: str) -> dict[str, Any]:
        return {"S": self.S, "max_weight": self.max_weight, "objective": objective, "mean_u": self.mean_u,
                "retention": self.retention}

    def _mean(self, total: np.ndarray) -> np.ndarray:
        return np.divide(total, self.counts, out=np.zeros(self.S), where=self.counts > 0)

    def mean_eta(self) -> np.ndarray:
        return self._mean(self.blocks.reduce("eta", None, self._params("l2"))[0])

    def worst(self, objective: str) -> np.ndarray:
        """Per-signature mean of the largest objective term a row can have on [0, Q]."""
        return self._mean(self.blocks.reduce("worst", None, self._params(objective))[0])

    def aggregate(self, t: np.ndarray, objective: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-signature means of q, f and -dq/dt at dual shifts ``t`` (one pass over the rows)."""
        sums = self.blocks.reduce("aggregate", np.asarray(t, np.float64), self._params(objective))
        return self._mean(sums[0]), self._mean(sums[1]), self._mean(sums[2])

    def close(self) -> None:
        self.blocks.close()
