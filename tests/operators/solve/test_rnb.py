"""R&B Balance: the update rule by hand, the proxy run's direction, weights and determinism."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from mmbalance.mixer import gram_matrix, rnb_update
from mmbalance.operators.solve import CorpusStats, solve, solution_from_dict
from mmbalance.operators.solve.rnb import eval_shares_by_nearest
from mmbalance.schemas.recipe import RecipeError, parse_recipe

DIM = 8


def _recipe(**balance):
    return parse_recipe({
        "input": {"columns": {"uid": "uid", "caption": "caption", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
        "labels": [{"name": "dom"}],
        "balance": {"method": "rnb", "by": "dom", "rounds": 4, "steps_per_round": 25, "batch_size": 64, **balance},
    })


def _fsl(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.astype(np.float16).reshape(-1)), m.shape[1])


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rotation(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def synthetic(seed: int = 0, rows=(300, 300, 300)):
    """Domains a, b, c with their own image clusters; text = R x: a and b share R, c has its own."""
    rng = np.random.default_rng(seed)
    shared, other = _rotation(rng, DIM), _rotation(rng, DIM)
    names, xs, ts = [], [], []
    for name, n, rot in zip("abc", rows, (shared, shared, other)):
        centre = _unit(rng.normal(size=DIM))
        x = _unit(centre + 0.6 * rng.normal(size=(n, DIM)) / np.sqrt(DIM))
        t = _unit(x @ rot.T + 0.05 * rng.normal(size=(n, DIM)))
        names += [name] * n
        xs.append(x)
        ts.append(t)
    x, t = np.vstack(xs), np.vstack(ts)
    sample = pa.table({
        "row": pa.array(np.arange(len(names)), pa.int64()),
        "uid": [f"u{i:05d}" for i in range(len(names))],
        "tag.dom": pa.array(names, pa.string()),
        "image_emb": _fsl(x),
        "text_emb": _fsl(t),
    })
    return sample, x, t, np.array(names)


def _stats(recipe, sample, corpus_counts: dict, eval_sample=None) -> CorpusStats:
    sig = pa.table({"tag.dom": pa.array(list(corpus_counts), pa.string()),
                    "count": pa.array(list(corpus_counts.values()), pa.int64())})
    stats = CorpusStats(recipe, sig, {"dom": [k for k in corpus_counts if k]}, sum(corpus_counts.values()), sample=sample)
    if eval_sample is not None:
        stats.eval_sample = eval_sample  # type: ignore[attr-defined]
    return stats


def test_update_rule_matches_a_hand_computed_case():
    sums = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    counts = np.array([2, 1, 3])
    # mean gradients: (1, 0), (1, 1), (0, -1)
    expected_g = [[1, 1, 0], [1, 2, -1], [0, -1, 1]]
    g = gram_matrix(sums, counts)
    assert g.tolist() == expected_g
    p_eval = np.array([0.5, 0.25, 0.25])
    s = [1 * 0.5 + 1 * 0.25 + 0, 1 * 0.5 + 2 * 0.25 - 0.25, 0 - 0.25 + 0.25]  # G p_eval = (0.75, 0.75, 0)
    norm = math.sqrt(sum(v * v for v in s))
    e = [math.exp(3.0 * v / norm) for v in s]
    assert rnb_update(g, p_eval, 3.0).tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)
    assert rnb_update(np.zeros((3, 3)), p_eval, 3.0).tolist() == pytest.approx([1 / 3] * 3)


def test_domain_aligned_with_the_eval_domain_is_upweighted():
    sample, *_ = synthetic()
    recipe = _recipe(eval_shares={"a": 1.0})
    sol = solve(_stats(recipe, sample, {"a": 3000, "b": 3000, "c": 3000}))
    p = dict(zip(sol.diagnostics["domains"], sol.diagnostics["p"]))
    # b's text mapping is a's, c's is not: b rises above c, and above its uniform start
    assert p["b"] > p["c"]
    assert p["b"] > 1 / 3 > p["c"]
    traj = sol.diagnostics["p_trajectory"]
    assert len(traj) == 5 and traj[0] == pytest.approx([1 / 3] * 3)
    assert len(sol.diagnostics["gram"]) == 4 and np.array(sol.diagnostics["gram"][0]).shape == (3, 3)
    g0 = np.array(sol.diagnostics["gram"][0])
    assert g0[0, 1] > g0[0, 2]  # a's gradient agrees more with b's than with c's
    # with the eval set on c instead, c wins
    sol_c = solve(_stats(_recipe(eval_shares={"c": 1.0}), sample, {"a": 3000, "b": 3000, "c": 3000}))
    p_c = dict(zip(sol_c.diagnostics["domains"], sol_c.diagnostics["p"]))
    assert p_c["c"] > max(p_c["a"], p_c["b"])


def test_eval_sample_is_assigned_to_the_nearest_domain():
    sample, x, t, names = synthetic(seed=1)
    eval_rows = sample.filter(pa.compute.equal(sample.column("tag.dom"), "a")).slice(0, 50)
    dom = np.array(["abc".index(n) for n in names])
    shares = eval_shares_by_nearest(x, dom, 3, x[dom == 0][:50])
    assert shares[0] > 0.9
    sol = solve(_stats(_recipe(), sample, {"a": 1000, "b": 1000, "c": 1000}, eval_sample=eval_rows))
    assert sol.diagnostics["p_eval_source"].startswith("eval_sample")
    assert sol.diagnostics["p_eval"][0] > 0.9


def test_weights_are_p_over_corpus_share_and_round_trip():
    sample, *_ = synthetic(seed=2, rows=(200, 200, 200))
    corpus = {"a": 6000, "b": 3000, "c": 1000, "z": 50, None: 400}  # z: not in the sample
    sol = solve(_stats(_recipe(), sample, corpus))
    p = dict(zip(sol.diagnostics["domains"], sol.diagnostics["p"]))
    tags = pa.table({"tag.dom": pa.array(["a", "b", "c", "z", None], pa.string())})
    w = sol.weights(tags)
    n = 10_000  # rows of the balanced domains
    assert w[:3].tolist() == pytest.approx([p["a"] * n / 6000, p["b"] * n / 3000, p["c"] * n / 1000], rel=1e-5)
    assert w[3] == 1.0 and w[4] == 1.0  # unbalanced domain and unlabeled rows keep weight 1
    assert sum(corpus[k] * wk for k, wk in zip("abc", w[:3])) == pytest.approx(n, rel=1e-5)
    again = solution_from_dict(sol.to_dict())
    assert again.weights(tags).tolist() == w.tolist()
    dropped = solve(_stats(_recipe(unlabeled="drop"), sample, corpus))
    assert dropped.weights(tags)[4] == 0.0


def test_seeded_and_independent_of_sample_order():
    sample, *_ = synthetic(seed=3)
    recipe = _recipe()
    one = solve(_stats(recipe, sample, {"a": 10, "b": 10, "c": 10})).to_dict()
    perm = np.random.default_rng(0).permutation(sample.num_rows)
    two = solve(_stats(recipe, sample.take(pa.array(perm)), {"a": 10, "b": 10, "c": 10})).to_dict()
    assert one == two
    other = solve(_stats(_recipe(seed=1), sample, {"a": 10, "b": 10, "c": 10})).to_dict()
    assert other["diagnostics"]["p"] != one["diagnostics"]["p"]


def test_large_gradients_are_sketched():
    sample, *_ = synthetic(seed=4)
    sol = solve(_stats(_recipe(gradient_dim=16), sample, {"a": 10, "b": 10, "c": 10}))
    assert sol.diagnostics["gradient_sketched"] is True
    assert sum(sol.diagnostics["p"]) == pytest.approx(1.0, abs=1e-5)


def test_needs_a_sample_and_a_known_label():
    with pytest.raises(ValueError, match="embedding sample"):
        solve(_stats(_recipe(), None, {"a": 10}))
    with pytest.raises(RecipeError, match="balance.by"):
        parse_recipe({"labels": [{"name": "dom"}], "balance": {"method": "rnb", "by": "nope"}})
