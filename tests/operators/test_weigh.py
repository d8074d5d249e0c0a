import numpy as np
import pyarrow as pa

from mmbalance.operators.solve import LookupSolution
from mmbalance.operators.hashing import shard_key, uniforms
from mmbalance.operators.weigh import stochastic_round, weigh_tags


def test_uniforms_depend_only_on_key_and_row():
    key = shard_key(0, "s-1")
    rows = np.arange(1000)
    u = uniforms(key, rows)
    assert ((u >= 0) & (u < 1)).all()
    assert np.array_equal(uniforms(key, rows[500:]), u[500:])
    assert not np.array_equal(uniforms(shard_key(1, "s-1"), rows), u)
    assert not np.array_equal(uniforms(shard_key(0, "s-2"), rows), u)


def test_stochastic_rounding_is_unbiased_and_exact_on_integers():
    rng = np.random.default_rng(0)
    w = rng.uniform(0, 3, size=200_000)
    rep = stochastic_round(w, shard_key(0, "a"), np.arange(len(w)))
    assert rep.dtype == np.int32
    assert (rep >= np.floor(w)).all() and (rep <= np.ceil(w)).all()
    # sum of independent Bernoullis: within 5 standard deviations of the expectation
    frac = w - np.floor(w)
    assert abs(rep.sum() - w.sum()) < 5 * np.sqrt((frac * (1 - frac)).sum())
    ints = np.array([0.0, 1.0, 2.0, 5.0])
    assert stochastic_round(ints, shard_key(0, "a"), np.arange(4)).tolist() == [0, 1, 2, 5]


def test_weigh_tags_builds_the_manifest():
    tags = pa.table({"row": pa.array([3, 4, 7], pa.int64()), "uid": ["a", "b", "c"], "tag.occ": ["x", "y", None]})
    sol = LookupSolution("t", ["tag.occ"], {"tag.occ": ["x", "y", None]}, [1.0, 0.0, 2.0])
    m = weigh_tags(tags, sol, seed=0, shard_id="sid", shard="dir/s.parquet")
    assert m.column("weight").to_pylist() == [1.0, 0.0, 2.0]
    assert m.column("repeats").to_pylist() == [1, 0, 2]
    assert m.column("row").to_pylist() == [3, 4, 7]
    assert set(m.column("shard").to_pylist()) == {"dir/s.parquet"}
