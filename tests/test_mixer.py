"""The online mixer: its docstring example runs, a numpy training loop written like the torch
example gives the offline rule's mixture, and the offline solver walks the same trajectory."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import mmbalance.mixer
from mmbalance.mixer import OnlineMixer, gram_matrix, rnb_update


def test_docstring_example_runs():
    result = doctest.testmod(mmbalance.mixer, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_numpy_loop_like_the_torch_example_matches_the_offline_rule():
    """A linear head y = W x; per batch the per-domain sums of outer(dL/dy, x) go to the mixer."""
    rng = np.random.default_rng(0)
    m, din, dout, batch, steps = 4, 6, 3, 32, 10
    w = rng.normal(size=(dout, din))
    mixer = OnlineMixer([f"d{i}" for i in range(m)], lam=2.0, p_eval=[0.1, 0.2, 0.3, 0.4])
    total = np.zeros((m, dout, din))
    counts = np.zeros(m)
    for _ in range(steps):
        domain = rng.choice(m, size=batch, p=mixer.p)
        x = rng.normal(size=(batch, din)) + domain[:, None]  # domains differ
        target = rng.normal(size=(batch, dout))
        y = x @ w.T
        dy = (y - target) / batch  # dL/dy of a mean squared error
        g = np.zeros((m, dout, din))
        np.add.at(g, domain, dy[:, :, None] * x[:, None, :])  # index_add_ of the example
        mixer.accumulate(g.reshape(m, -1), np.bincount(domain, minlength=m))
        total += g
        counts += np.bincount(domain, minlength=m)
        w -= 0.1 * dy.T @ x
    p = mixer.step()
    offline = rnb_update(gram_matrix(total.reshape(m, -1), counts), np.array([0.1, 0.2, 0.3, 0.4]), 2.0)
    assert p.tolist() == pytest.approx(offline.tolist(), rel=1e-12)
    assert len(mixer.history) == 2 and len(mixer.grams) == 1
    assert mixer.mixture() == dict(zip(mixer.domains, p.tolist()))
    # the round was reset: a new round needs new gradients
    with pytest.raises(RuntimeError):
        mixer.step()


def test_offline_solver_trajectory_is_the_mixer_rule():
    """Each recorded p of the proxy run is the rule applied to the recorded Gram matrix."""
    from mmbalance.operators.solve.rnb import proxy_balance
    from mmbalance.schemas.balance import RnbBalance

    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 5))
    t = rng.normal(size=(120, 5))
    dom = rng.integers(0, 3, 120)
    step = RnbBalance(method="rnb", by="d", rounds=3, steps_per_round=5, batch_size=16, lam=3.0)
    p_eval = np.array([0.2, 0.3, 0.5])
    run = proxy_balance(x, t, dom, 3, step, p_eval, np.full(3, 1 / 3))
    assert len(run.trajectory) == 4
    for gram, p in zip(run.grams, run.trajectory[1:]):
        assert p.tolist() == pytest.approx(rnb_update(gram, p_eval, 3.0).tolist(), rel=1e-12)


def test_accepts_tensor_like_inputs_and_checks_shapes():
    class FakeTensor:  # what the mixer needs from a torch tensor
        def __init__(self, a):
            self.a = np.asarray(a, dtype=float)

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    mixer = OnlineMixer(["a", "b"], lam=1.0)
    p = mixer.update(FakeTensor([[1.0, 0.0], [0.0, 1.0]]), FakeTensor([1, 1]))
    assert p.tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError):
        mixer.accumulate(np.zeros((2, 2)), [1, 1, 1])
    with pytest.raises(ValueError):
        OnlineMixer(["a"], p_eval=[0.5, 0.5])
    with pytest.raises(ValueError):
        OnlineMixer([], lam=1.0)
