"""R&B's Balance rule as a small class a training loop calls between rounds (docs/algorithms.md section 2).

In each round, accumulate per domain i the sum g_i of its samples' final-layer gradients and the
number of samples |S_i|; at the end of the round

    G_ij   = (g_i . g_j) / (|S_i| |S_j|)
    p_next = softmax(lam * G p_eval / ||G p_eval||_2)

and train the next round with the mixture ``p_next``. For a linear final layer ``y = W x`` the
per-sample gradient is ``outer(dL/dy, x)``, so the per-domain sums cost one matrix product:
``g_d = dY[d].T @ X[d]``. The offline solver (``balance.method: rnb``) uses the same functions.

Example with numpy arrays (three domains; domain 0's mean gradient equals domain 2's, domain 1's
opposes it; the evaluation set is all domain 2):

>>> import numpy as np
>>> mixer = OnlineMixer(["web", "books", "eval-like"], lam=3.0, p_eval=[0, 0, 1])
>>> g = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])   # summed gradients, one row per domain
>>> p = mixer.update(g, counts=[1, 1, 2])
>>> p.round(3).tolist()
[0.492, 0.015, 0.492]
>>> int(np.argmin(p))
1

A plain torch loop (the final layer is ``model.head``, an ``nn.Linear``; ``domain`` is the batch's
domain ids) keeps ``x`` and ``dL/dy`` with a hook and calls the mixer every ``round_steps``::

    mixer = OnlineMixer(domains, lam=3.0)
    feats = {}
    model.head.register_forward_hook(lambda m, inp, out: feats.update(x=inp[0].detach(), y=out))
    for step, (images, texts, domain) in enumerate(loader):      # loader draws with mixer.p
        loss = loss_fn(model(images, texts))
        feats["y"].retain_grad()
        loss.backward()
        dy, x = feats["y"].grad, feats["x"]
        g = torch.zeros(len(domains), dy.shape[1], x.shape[1]).index_add_(0, domain, dy[:, :, None] * x[:, None, :])
        mixer.accumulate(g.flatten(1), torch.bincount(domain, minlength=len(domains)))
        optimizer.step(); optimizer.zero_grad()
        if (step + 1) % round_steps == 0:
            loader.sampler.weights = mixer.step()                # the next round's mixture
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def gram_matrix(grad_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """G_ij = (g_i . g_j) / (|S_i| |S_j|) from per-domain gradient sums (m, D) and counts (m,).
    A domain with no samples this round has a zero row and column."""
    g = _numpy(grad_sums).reshape(len(grad_sums), -1)
    n = _numpy(counts)
    mean = np.divide(g, n[:, None], out=np.zeros_like(g), where=n[:, None] > 0)
    return mean @ mean.T


def rnb_update(gram: np.ndarray, p_eval: np.ndarray, lam: float) -> np.ndarray:
    """p = softmax(lam * G p_eval / ||G p_eval||_2); uniform when G p_eval is zero."""
    s = _numpy(gram) @ _numpy(p_eval)
    norm = float(np.linalg.norm(s))
    z = lam * s / norm if norm > 0 else np.zeros_like(s)
    z = np.exp(z - z.max())
    return z / z.sum()


class OnlineMixer:
    """The next domain mixture from per-domain gradients, round after round."""

    def __init__(self, domains: Sequence[str], lam: float = 3.0, p_eval: Sequence[float] | None = None,
                 p_init: Sequence[float] | None = None):
        self.domains = list(domains)
        m = len(self.domains)
        if m == 0:
            raise ValueError("OnlineMixer needs at least one domain")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = float(lam)
        self.p_eval = self._distribution(p_eval, "p_eval")
        self.p = self._distribution(p_init, "p_init")
        self.history: list[np.ndarray] = [self.p.copy()]
        self.grams: list[np.ndarray] = []
        self._g: np.ndarray | None = None
        self._n = np.zeros(m)

    def _distribution(self, p: Sequence[float] | None, name: str) -> np.ndarray:
        m = len(self.domains)
        if p is None:
            return np.full(m, 1.0 / m)
        arr = _numpy(p)
        if arr.shape != (m,) or np.any(arr < 0) or arr.sum() <= 0:
            raise ValueError(f"{name} must be {m} non-negative numbers with a positive sum")
        return arr / arr.sum()

    def accumulate(self, grad_sums: Any, counts: Any) -> None:
        """Add a batch's per-domain gradient sums (m, ...) and sample counts (m,)."""
        g = _numpy(grad_sums).reshape(len(self.domains), -1)
        n = _numpy(counts)
        if n.shape != (len(self.domains),):
            raise ValueError(f"counts must have one entry per domain ({len(self.domains)})")
        self._g = g.copy() if self._g is None else self._g + g
        self._n += n

    def step(self) -> np.ndarray:
        """End the round: the Gram matrix of this round's gradients gives the next mixture."""
        if self._g is None:
            raise RuntimeError("no gradients accumulated this round")
        gram = gram_matrix(self._g, self._n)
        self.p = rnb_update(gram, self.p_eval, self.lam)
        self.grams.append(gram)
        self.history.append(self.p.copy())
        self._g, self._n = None, np.zeros(len(self.domains))
        return self.p

    def update(self, grad_sums: Any, counts: Any) -> np.ndarray:
        """``accumulate`` then ``step``: one call per round when the sums are already totalled."""
        self.accumulate(grad_sums, counts)
        return self.step()

    def mixture(self) -> dict[str, float]:
        return dict(zip(self.domains, self.p.tolist()))
