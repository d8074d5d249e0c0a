"""Clustering operators: embeddings from Arrow, bottom-k sampling, faiss k-means, assignment,
silhouette k sweep, SBCL subclasses, as a run calls them. Data: points on the sphere around planted
centres."""

from __future__ import annotations

import os
import tracemalloc

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from mmbalance.io.store import RunStore
from mmbalance.operators.arrays import embedding_matrix, fixed_size_list, unit_rows
from mmbalance.operators.cluster.index import assign, cluster_index, level_ids
from mmbalance.operators.cluster.kmeans import KMeansModel, fit_kmeans, greedy_kmeanspp
from mmbalance.operators.cluster.sampling import merge_samples
from mmbalance.operators.cluster.sbcl import SubclassModel, fit_subclasses, sbcl_subclass_counts, subclass_caps
from mmbalance.operators.cluster.select_k import silhouette_cosine, sweep_k
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.hashing import sample_priority
from mmbalance.operators.models import load_models, save_model

faiss.omp_set_num_threads(1)

IMG = EmbeddingSpec("image", image_column="img")


def planted(n: int, k: int, d: int, noise: float, seed: int, sizes=None):
    """Unit vectors around k random unit centres; returns (x, labels, centres)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(k, d)))[0]
    labels = rng.choice(k, size=n, p=None if sizes is None else np.asarray(sizes) / np.sum(sizes))
    x = unit_rows(centres[labels] + rng.normal(0, noise / np.sqrt(d), size=(n, d)))[0]
    return x, labels, centres


def corpus_table(x: np.ndarray, dtype=np.float16, prefix="u", extra=None) -> pa.Table:
    cols = {"uid": pa.array([f"{prefix}{i:07d}" for i in range(len(x))]), "img": fixed_size_list(x.astype(dtype))}
    return pa.table({**cols, **(extra or {})})


# ----------------------------------------------------------------------------- embeddings


def test_fixed_size_list_fp16_is_a_zero_copy_view():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float16)
    col = fixed_size_list(x)
    m, valid = embedding_matrix(pa.chunked_array([col.slice(10, 30)]))
    assert m.dtype == np.float16 and m.shape == (30, 8) and valid.all()
    assert np.shares_memory(m, np.frombuffer(col.values.buffers()[1], np.float16))
    np.testing.assert_array_equal(m, x[10:40])


def test_variable_lists_with_nulls_and_wrong_length():
    arr = pa.array([[1.0, 0.0], None, [0.0, 2.0]], pa.list_(pa.float32()))
    m, valid = embedding_matrix(arr)
    np.testing.assert_array_equal(valid, [True, False, True])
    np.testing.assert_array_equal(m, [[1, 0], [0, 0], [0, 2]])
    with pytest.raises(ValueError, match="lengths"):
        embedding_matrix(pa.array([[1.0, 0.0], [1.0, 2.0, 3.0]], pa.list_(pa.float32())))
    # empty and all-null batches decode to nothing usable instead of failing
    empty = pa.table({"img": pa.array([], pa.list_(pa.float32()))})
    nulls = pa.table({"img": pa.array([None, None], pa.list_(pa.float32()))})
    centroids = np.eye(2, dtype=np.float32)
    assert assign(empty, centroids, embedding=IMG)[0].tolist() == []
    assert assign(nulls, centroids, embedding=IMG)[0].tolist() == [-1, -1]


def test_mean_embedding_is_normalised_mean_of_normalised_columns():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6)) * 5
    t = pa.table({"i": fixed_size_list(a.astype(np.float32)), "t": fixed_size_list(b.astype(np.float32))})
    x, ok = EmbeddingSpec("mean", image_column="i", text_column="t").extract(t)
    ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    want = (ua + ub) / np.linalg.norm(ua + ub, axis=1, keepdims=True)
    assert ok.all()
    np.testing.assert_allclose(x, want, atol=1e-6)
    with pytest.raises(ValueError, match="text_column"):
        EmbeddingSpec("mean", image_column="i")


# ----------------------------------------------------------------------------- sampling


def _brute_force_bottom_k(uids: list[str], seed: int, k: int) -> list[str]:
    prio = sample_priority(pa.array(uids), seed)
    return [uids[i] for i in sorted(range(len(uids)), key=lambda i: (prio[i], uids[i]))[:k]]


def _keys(table: pa.Table, seed: int, stratum: str | None = None) -> pa.Table:
    """A corpus's sample keys as a run builds them from its tags: uid, seeded priority, [stratum],
    here with the embedding riding along (a selection keeps every column of its rows)."""
    cols = {"uid": table.column("uid"), "priority": pa.array(sample_priority(table.column("uid"), seed), pa.uint64())}
    if stratum is not None:
        cols["stratum"] = table.column(stratum)
    return pa.table({**cols, "img": table.column("img")})


def _sample_shards(table: pa.Table, cuts: list[int], batch_rows: int, seed: int, **select) -> list[pa.Table]:
    """Each shard's selection, merged batch by batch as a shard's stream arrives."""
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, table.num_rows]):
        keys = _keys(table.slice(lo, hi - lo), seed, "cls" if "per_stratum" in select else None)
        out.append(merge_samples((keys.slice(b, batch_rows) for b in range(0, max(keys.num_rows, 1), batch_rows)), **select))
    return out


def _matrix(sample: pa.Table) -> np.ndarray:
    return unit_rows(embedding_matrix(sample.column("img"))[0])[0]


def test_bottom_k_merge_is_independent_of_shard_split():
    x, _, _ = planted(6000, 5, 16, 0.5, seed=2)
    table = corpus_table(x)
    want = _brute_force_bottom_k(table.column("uid").to_pylist(), seed=7, k=500)
    rng = np.random.default_rng(3)
    # shuffled row order, several shard splits and batch sizes: always the same sample, same order
    shuffled = table.take(pa.array(rng.permutation(table.num_rows)))
    splits = [([], 6000), ([100, 2500, 2501, 5000], 333), (sorted(rng.choice(6000, 9, replace=False).tolist()), 97)]
    for cuts, batch_rows in splits:  # small batches exercise the pre-filter thresholds
        samples = _sample_shards(shuffled, cuts, batch_rows, seed=7, k=500)
        for lo, hi, sample in zip([0, *cuts], [*cuts, 6000], samples):  # each shard's sample is exact too
            shard_uids = shuffled.column("uid").to_pylist()[lo:hi]
            assert sample.column("uid").to_pylist() == _brute_force_bottom_k(shard_uids, seed=7, k=500)
        merged = merge_samples(samples[::-1], k=500)
        assert merged.column("uid").to_pylist() == want
    # the embeddings travel with their uids (fp16 -> unit float32)
    idx = [int(u[1:]) for u in want[:5]]
    np.testing.assert_allclose(_matrix(merged)[:5], unit_rows(x[idx].astype(np.float16))[0], atol=1e-6)
    # a different seed is a different sample
    assert merge_samples(_sample_shards(table, [3000], 1000, seed=8, k=500), k=500).column("uid").to_pylist() != want


def test_bottom_k_sample_is_uniform():
    # a planted 10% group keeps its share in the sample (binomial sd ~ 0.0067 at k=2000)
    n, k = 20000, 2000
    marked = set(np.random.default_rng(4).choice(n, n // 10, replace=False).tolist())
    uids = [f"r{i}" for i in range(n)]
    shares = []
    for seed in range(3):
        chosen = _brute_force_bottom_k(uids, seed, k)
        shares.append(sum(int(u[1:]) in marked for u in chosen) / k)
    assert all(abs(s - 0.1) < 0.03 for s in shares), shares


def test_stratified_sample_caps_each_stratum_and_merges_exactly():
    x, labels, _ = planted(3000, 3, 8, 0.5, seed=5, sizes=[2500, 400, 100])
    names = np.array(["head", "mid", "tail"])[labels].astype(object)
    names[::50] = None  # a null stratum
    table = corpus_table(x, extra={"cls": pa.array(names.tolist(), pa.string())})
    caps = {"head": 150, "mid": 150, "tail": 150, None: 10}
    kwargs = {"per_stratum": caps, "seed": 11}
    one = _sample_shards(table, [], 3000, **kwargs)[0]
    for batch_rows in (3000, 200, 7):
        shards = _sample_shards(table, [700, 1900], batch_rows, **kwargs)
        for lo, hi, shard in zip([0, 700, 1900], [700, 1900, 3000], shards):
            want = _sample_shards(table.slice(lo, hi - lo), [], 3000, **kwargs)[0]  # one batch
            assert shard.column("uid").to_pylist() == want.column("uid").to_pylist()
        split = merge_samples(shards, per_stratum=caps)
        assert one.column("uid").to_pylist() == split.column("uid").to_pylist()
    got = {v: c for v, c in zip(*[pc.value_counts(one.column("stratum")).field(f).to_pylist() for f in ("values", "counts")])}
    true = {v: int((names == v).sum()) if v else int(sum(n is None for n in names)) for v in caps}
    assert got == {v: min(caps[v], true[v]) for v in caps}
    # within a stratum it is the bottom-k of that stratum's uids
    uids = np.array(table.column("uid").to_pylist())
    tail = _brute_force_bottom_k(uids[names == "tail"].tolist(), seed=11, k=150)
    assert sorted(u for u, s in zip(one.column("uid").to_pylist(), one.column("stratum").to_pylist()) if s == "tail") == sorted(tail)


# ----------------------------------------------------------------------------- fit + assign


def test_fit_on_sample_assign_all_recovers_planted_clusters(tmp_path):
    x, labels, _ = planted(20000, 12, 64, 0.9, seed=6, sizes=np.linspace(1, 4, 12))
    table = corpus_table(x)
    sample = merge_samples(_sample_shards(table, [7000, 15000], 4096, seed=0, k=3000), k=3000)
    model = fit_kmeans(_matrix(sample), 12, seed=0, niter=20, nredo=3, max_points_per_centroid=200, embedding=IMG)
    assert model.meta["n_sample"] == 3000 and model.meta["n_trained"] == 2400  # 12 * 200: faiss's subsample
    assert model.meta["max_points_per_centroid"] == 200 and model.meta["embedding"]["image_column"] == "img"
    ids, dist = assign(table, model, embedding=IMG, batch_rows=5000)
    assert adjusted_rand_score(labels, ids) >= 0.9
    assert ids.dtype == np.int32 and dist.dtype == np.float32 and np.all((dist >= 0) & (dist <= 2))
    store = RunStore(str(tmp_path))
    save_model(store, "concept", model)
    again = load_models(store)["concept"]
    np.testing.assert_array_equal(again.centroids, model.centroids)
    assert again.meta["seed"] == 0 and again.meta["inertia"] == pytest.approx(model.meta["inertia"])
    # the assign stage searches the loaded model's index (built once per process)
    got, _ = assign(table.slice(0, 1000), None, embedding=IMG, index=again.search_index)
    np.testing.assert_array_equal(got, ids[:1000])


def test_fit_is_deterministic_for_a_seed():
    x, _, _ = planted(3000, 6, 16, 0.7, seed=7)
    a = fit_kmeans(x, 6, seed=3, niter=10)
    b = fit_kmeans(x, 6, seed=3, niter=10)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="at least k"):
        fit_kmeans(x[:5], 6)


def test_greedy_seeding_and_restarts():
    x, _, _ = planted(4000, 8, 16, 0.8, seed=18, sizes=2.0 ** -np.arange(8))
    seeds = greedy_kmeanspp(x, 8, seed=1, init_size=1000)
    np.testing.assert_array_equal(seeds, greedy_kmeanspp(x, 8, seed=1, init_size=1000))
    assert len(np.unique(seeds, axis=0)) == 8 and np.all((seeds[:, None] == x[None]).all(-1).any(1))
    # restarts alone (split-and-merge trials off): the first restart is the nredo=1 run
    one = fit_kmeans(x, 8, seed=2, niter=5, nredo=1, swaps=0)
    three = fit_kmeans(x, 8, seed=2, niter=5, nredo=3, swaps=0)
    assert three.meta["mean_cosine"] >= one.meta["mean_cosine"] and three.meta["init_size"] == 4000
    assert one.meta["init"] == "greedy-kmeans++"  # "auto" at small k
    for init in ("kmeans++", "random"):
        assert fit_kmeans(x, 8, seed=2, niter=5, init=init).meta["init"] == init


def test_assign_from_arrow_fp16_equals_assign_from_float32_matrix():
    x, _, _ = planted(4000, 10, 32, 1.5, seed=8)
    centroids = unit_rows(np.random.default_rng(9).normal(size=(25, 32)))[0]
    x16 = x.astype(np.float16)
    want_ids, want_dist = assign(x16.astype(np.float32), centroids)
    for col in (fixed_size_list(x16), pa.array(list(x16.astype(np.float32)), pa.list_(pa.float32()))):
        ids, dist = assign(pa.table({"img": col}), centroids, embedding=IMG, batch_rows=999)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(dist, want_dist, atol=1e-6)
    # against an independent brute force on the matrix
    np.testing.assert_array_equal(want_ids, np.argmax(unit_rows(x16)[0] @ centroids.T, axis=1))


def test_unusable_rows_get_minus_one_and_levels_follow():
    x, _, _ = planted(10, 2, 4, 0.1, seed=10)
    x[3] = np.nan
    x[5] = 0.0
    col = fixed_size_list(x.astype(np.float32))
    col = pa.FixedSizeListArray.from_arrays(col.values, 4, mask=pa.array([i == 7 for i in range(10)]))
    table = pa.table({"row": pa.array(range(10), pa.int64()), "uid": [str(i) for i in range(10)], "img": col})
    model = KMeansModel(unit_rows(x[[0, 1]])[0], {"parents": [[1, 0]]})
    ids, dist = assign(table, None, embedding=IMG, index=model.search_index)
    assert set(np.flatnonzero(ids == -1)) == {3, 5, 7}
    assert np.isnan(dist[[3, 5, 7]]).all()
    (l2,) = level_ids(ids, model.parents)
    np.testing.assert_array_equal(l2, np.where(ids >= 0, 1 - ids, -1))


def test_assignment_working_memory_is_bounded_by_the_batch():
    # numpy allocations are traced (Arrow and faiss buffers are not): the float32 working copy
    # must scale with batch_rows, not with the table. Output arrays take n * 8 bytes.
    n, d = 60_000, 64
    x, _, _ = planted(n, 4, d, 1.0, seed=12)
    table = corpus_table(x)
    del x
    centroids = unit_rows(np.random.default_rng(0).normal(size=(16, d)))[0]
    full_matrix = n * d * 4

    def peak(batch_rows: int) -> int:
        tracemalloc.start()
        assign(table, centroids, embedding=IMG, batch_rows=batch_rows)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, whole = peak(2048), peak(n)
    assert whole >= full_matrix  # the measurement sees the working copy at all
    assert small < n * 8 + 6 * 2048 * d * 4 < full_matrix / 2

    # many batches through one index, as the assign stage calls it: peak stays at one batch's size
    index = cluster_index(centroids)
    batches = table.to_batches(2048)
    tracemalloc.start()
    counts = np.zeros(16, np.int64)
    for batch in batches:
        ids, _ = assign(pa.Table.from_batches([batch]), None, embedding=IMG, index=index, batch_rows=2048)
        counts += np.bincount(ids, minlength=16)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert counts.sum() == n and top < 8 * 2048 * d * 4


# ----------------------------------------------------------------------------- k selection


def test_silhouette_matches_sklearn_cosine():
    x, labels, _ = planted(700, 5, 12, 1.0, seed=13)
    labels[0] = 99  # a singleton cluster scores 0 in both
    want = silhouette_score(x, labels, metric="cosine")
    assert silhouette_cosine(x, labels, chunk_rows=128) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="clusters"):
        silhouette_cosine(x, np.zeros(len(x)))


def test_silhouette_sweep_picks_the_planted_k():
    x, _, _ = planted(6000, 7, 32, 0.6, seed=14)
    sweep = sweep_k(x, [3, 5, 7, 9, 12], score_rows=1500, seed=0, niter=15, nredo=2)
    assert sweep.best_k == 7, sweep.scores
    assert set(sweep.scores) == {3, 5, 7, 9, 12} and sweep.score_rows == 1500
    assert sweep.best.k == 7 and sweep.to_dict()["silhouette"]["7"] == sweep.scores[7]


# ----------------------------------------------------------------------------- SBCL


@pytest.mark.parametrize(
    "sizes, m0, want",
    [
        ([1000, 100, 35], 10, [28, 2, 1]),  # min class 35 > M0: K = n // 35
        ([1000, 5, 64], 10, [100, 1, 6]),  # min class 5 < M0: K = n // 10, at least 1
        ([7, 0, 30], 10, [1, 0, 3]),  # an empty class gets no subclass and is not the min
        ([19, 19], 20, [1, 1]),
    ],
)
def test_sbcl_subclass_counts_rule(sizes, m0, want):
    np.testing.assert_array_equal(sbcl_subclass_counts(np.array(sizes), m0), want)


def test_sbcl_counts_against_the_rule_on_random_sizes():
    rng = np.random.default_rng(15)
    for _ in range(200):
        sizes = rng.integers(0, 5000, size=rng.integers(1, 12))
        m0 = int(rng.integers(1, 100))
        got = sbcl_subclass_counts(sizes, m0)
        nonempty = [s for s in sizes if s > 0]
        for s, k in zip(sizes, got):
            assert k == (0 if s == 0 else max(1, s // max(min(nonempty), m0)))


def test_sbcl_subclasses_recover_planted_structure_with_unique_ids(tmp_path):
    # classes of 2400 / 1600 / 800 rows, each made of 3 / 2 / 1 planted subclasses of 800: with
    # M0 = 100 the rule gives K = 3, 2, 1, and k-means inside each class must find them
    rng = np.random.default_rng(16)
    d = 48
    sub_centres = unit_rows(rng.normal(size=(6, d)))[0]
    sub_class = np.array([0, 0, 0, 1, 1, 2])
    truth = np.repeat(np.arange(6), 800)
    x = unit_rows(sub_centres[truth] + rng.normal(0, 0.8 / np.sqrt(d), size=(len(truth), d)))[0]
    names = np.array(["cat", "dog", "eel"])[sub_class[truth]]
    # fit on a per-class capped sample, as the fit caps it; K_c comes from the corpus counts
    sizes = {n: int((names == n).sum()) for n in ["cat", "dog", "eel"]}
    caps, per_subclass = subclass_caps(sizes, 100, 300, budget=1800)
    assert per_subclass == 300 and caps == {"cat": 900, "dog": 600, "eel": 300}
    table = corpus_table(x, extra={"cls": pa.array(names.tolist())})
    sample = merge_samples(_sample_shards(table, [2000], 2000, seed=1, per_stratum=caps), per_stratum=caps)
    model = fit_subclasses(_matrix(sample), sample.column("stratum"), m0=100, class_sizes=sizes, seed=0, niter=20)
    assert model.classes == ["cat", "dog", "eel"] and model.counts.tolist() == [3, 2, 1]
    ids, dist = model.assign(x, names)
    assert adjusted_rand_score(truth, ids) >= 0.9
    for i, name in enumerate(model.classes):  # ids unique across classes: each class owns its range
        own = ids[names == name]
        assert own.min() >= model.offsets[i] and own.max() < model.offsets[i] + model.counts[i]
    assert len(np.unique(ids)) == 6 and np.all(dist >= 0)
    # unknown and null classes are not assigned
    odd, _ = model.assign(x[:3], pa.array(["cat", None, "yak"]))
    assert odd[0] >= 0 and odd[1] == -1 and odd[2] == -1
    store = RunStore(str(tmp_path))
    save_model(store, "sub", model)
    again = load_models(store)["sub"]
    assert isinstance(again, SubclassModel) and again.classes == model.classes
    assert np.array_equal(again.assign(x, names)[0], ids)
    assert again.tags(np.array([0, 3, 5, -1])).to_pylist() == ["cat/0", "dog/0", "eel/0", None]


def test_sbcl_refuses_too_few_fit_points():
    x, _, _ = planted(50, 2, 8, 0.5, seed=17)
    with pytest.raises(ValueError, match="fit points"):
        fit_subclasses(x, ["a"] * 50, m0=1, class_sizes={"a": 5000, "b": 10})


def test_sbcl_on_top_level_clusters_as_classes(tmp_path):
    # classes can be cluster ids (ints): split each top-level cluster into SBCL subclasses
    x, _, _ = planted(3000, 4, 24, 0.5, seed=19, sizes=[6, 3, 2, 1])
    top = fit_kmeans(x, 4, seed=0, niter=10, nredo=2)
    cls, _ = assign(x, top)
    model = fit_subclasses(x, cls, m0=10, seed=0, niter=5)
    sizes = np.bincount(cls, minlength=4)
    np.testing.assert_array_equal(model.counts, sbcl_subclass_counts(sizes, 10))
    assert model.classes == [0, 1, 2, 3]
    ids, _ = model.assign(x, cls)
    assert ids.min() >= 0 and len(np.unique(ids)) == model.counts.sum()
    store = RunStore(str(tmp_path))
    save_model(store, "sub", model)
    np.testing.assert_array_equal(load_models(store)["sub"].assign(x, cls)[0], ids)
