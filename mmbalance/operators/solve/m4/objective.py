"""M4's primal term and its closed forms (docs/algorithms.md section 1), the one place they are written.

Every path evaluates the same thing: the signature dual (a weight per signature), the streaming
path's row blocks (a weight per row), the embedding path's row blocks, and the solutions the weigh
stage applies to every row. For a baseline eta and a dual shift t the minimiser of f(q; eta) + t q
over q in [0, Q] is closed form:

    L2   f = (q - eta)^2 / 2                q = clip(eta - t, 0, Q)         -dq/dt = 1 inside (0, Q)
    KL   f = q log(q / eta) - q + eta       q = min(eta exp(-t), Q)         -dq/dt = q below Q

(KL as exp(min(log eta - t, log Q)), so eta = 0 gives q = 0 without a warning). numpy only: a Ray
worker reducing a row block or applying a solution does not load the solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

OBJECTIVES = ("l2", "kl")


@dataclass(frozen=True)
class Objective:
    """The primal term of one M4 step: ``kind`` (l2 or kl) and the largest weight Q."""

    kind: str
    max_weight: float

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"m4 objective must be one of {OBJECTIVES}, got {self.kind!r}")

    @classmethod
    def of(cls, params: dict[str, Any]) -> "Objective":
        """From a row block's reduction parameters (``objective``, ``max_weight``)."""
        return cls(params["objective"], float(params["max_weight"]))

    def baselines(self, u: np.ndarray, retention: float, mean_u: float) -> np.ndarray:
        """eta_i = clip(retention u_i / mean(u), 0, Q) (the retention itself, capped, without utility)."""
        Q = self.max_weight
        return np.clip(retention * u / mean_u, 0.0, Q) if mean_u > 0 else np.full(len(u), min(retention, Q))

    def minimiser(self, eta: np.ndarray, t: np.ndarray,
                  log_eta: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q, the term f(q) and -dq/dt at shifts ``t`` (``log_eta``: log(eta), when the caller keeps it)."""
        Q = self.max_weight
        if self.kind == "l2":
            z = eta - t
            q = np.clip(z, 0.0, Q)
            return q, 0.5 * (q - eta) ** 2, ((z > 0.0) & (z < Q)).astype(np.float64)
        if log_eta is None:
            with np.errstate(divide="ignore"):
                log_eta = np.log(eta)
        log_q_max = math.log(Q)
        logq = np.minimum(log_eta - t, log_q_max)
        q = np.exp(logq)
        with np.errstate(invalid="ignore"):  # eta = 0: q = 0 and f = 0
            f = np.where(q > 0, q * (logq - log_eta), 0.0) - q + eta
        return q, f, np.where(log_eta - t < log_q_max, q, 0.0)

    def weights(self, eta: np.ndarray, t: np.ndarray) -> np.ndarray:
        """q alone (what the weigh stage applies)."""
        return self.minimiser(eta, t)[0]

    def terms(self, eta: np.ndarray, q: np.ndarray) -> np.ndarray:
        """f(q; eta) at given weights (another solver's q)."""
        if self.kind == "l2":
            return 0.5 * (q - eta) ** 2
        from scipy.special import xlogy  # the solver's side only: workers never call this

        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(q > 0, xlogy(q, q) - xlogy(q, eta), 0.0) - q + eta

    def worst(self, eta: np.ndarray) -> np.ndarray:
        """The largest term each baseline can have on [0, Q]: a dual value above their sum
        certifies infeasibility (weak duality)."""
        Q = self.max_weight
        if self.kind == "l2":
            return 0.5 * np.maximum(eta, Q - eta) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            at_q = np.where(eta > 0, Q * (math.log(Q) - np.log(eta)) - Q + eta, 0.0)
        return np.maximum(eta, at_q)
