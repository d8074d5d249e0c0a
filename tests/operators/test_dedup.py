import numpy as np
import pyarrow as pa

from mmbalance.operators.dedup import bucket_bounds, find_duplicates


def test_bucket_bounds_cover_the_space():
    b = bucket_bounds(7)
    assert b[0][0] == 0 and b[-1][1] == 2**64 - 1
    assert all(b[i][1] + 1 == b[i + 1][0] for i in range(6))


def test_first_occurrence_wins_and_collisions_are_not_duplicates():
    uids = {(0, 5): "x", (1, 2): "x", (0, 9): "x", (2, 0): "y", (2, 1): "z"}
    shard = np.array([1, 0, 0, 2, 2])
    row = np.array([2, 9, 5, 0, 1])
    # y and z share a hash on purpose: a collision, not a duplicate
    h = np.array([7, 7, 7, 3, 3], np.uint64)

    def fetch(s, rows):
        return [uids[(s, int(r))] for r in rows]

    dups = find_duplicates(shard, row, h, fetch).to_pylist()
    assert sorted((d["shard_index"], d["row"]) for d in dups) == [(0, 9), (1, 2)]
    assert all((d["first_shard_index"], d["first_row"]) == (0, 5) for d in dups)


def test_no_candidates_reads_no_uids():
    def fetch(s, rows):
        raise AssertionError("no uid should be fetched")

    assert find_duplicates(np.array([0, 1]), np.array([0, 0]), np.array([1, 2], np.uint64), fetch).num_rows == 0


def test_duplicates_equal_a_plain_python_reference_with_planted_collisions():
    """Every later occurrence of a uid (by shard, then row) names the first; rows whose hashes
    collide but whose uids differ are not duplicates (hashes cut to a few values plant collisions)."""
    rng = np.random.default_rng(0)
    for trial in range(100):
        n = int(rng.integers(1, 3000))
        keys = rng.choice(5 * 100_000, size=n, replace=False)  # distinct (shard, row)
        shard, row = keys // 100_000, keys % 100_000
        uid = np.array([f"u{v}" for v in rng.integers(0, max(1, n // 3), n)], dtype=object)
        uid_of = dict(zip(zip(shard.tolist(), row.tolist()), uid.tolist()))
        h = np.array([int(u[1:]) % (7 if trial % 2 else 2**40) for u in uid], np.uint64)

        def fetch(s, rows):
            return [uid_of[(s, int(r))] for r in rows]

        first: dict[str, tuple[int, int]] = {}
        want = set()
        for s, r in sorted(uid_of):
            u = uid_of[(s, r)]
            if u in first:
                want.add((s, r, u, *first[u]))
            else:
                first[u] = (s, r)
        got = find_duplicates(shard, row, h, fetch).to_pylist()
        assert {(d["shard_index"], d["row"], d["uid"], d["first_shard_index"], d["first_row"]) for d in got} == want
        assert len(got) == len(want)
