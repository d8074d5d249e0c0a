"""Every hash a run keys files or draws by, against plain-Python references of the published
algorithms (FNV-1a 64, splitmix64) and pinned values: a change here silently breaks dedup, the fit
sample, the audit samples and the stochastic rounding across mmbalance versions."""

import hashlib

import numpy as np
import pyarrow as pa

from mmbalance.operators.hashing import (audit_priority, blake2b_priority, hash_uids, sample_priority, sample_priority_of_hashes,
                                         shard_key, uniforms)

MASK = 2**64 - 1


def _finalise(h: int) -> int:
    """splitmix64's finaliser, by its definition."""
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


def _reference_hash(uid: str) -> int:
    """FNV-1a 64 over the UTF-8 bytes, then splitmix64's finaliser: the definition, byte by byte."""
    h = 0xCBF29CE484222325
    for b in uid.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return _finalise(h)


def _splitmix64(state: int) -> int:
    return _finalise((state + 0x9E3779B97F4A7C15) & MASK)


def test_hashes_are_pinned_to_their_definition():
    # pinned values: a change here silently breaks dedup and sample priorities across versions
    uids = ["abc", "", "uid-123", "é" * 700, "x" * 5000 + "y"]  # the last two pass the numpy byte limit
    pinned = [996580060897260808, 17665956581633026203, 5771212521346449656, 4378476658494685035,
              12162346476839719536]
    assert hash_uids(pa.array(uids)).tolist() == pinned
    assert [_reference_hash(u) for u in uids] == pinned
    rng = np.random.default_rng(1)
    strings = ["".join(map(chr, rng.integers(32, 0x2000, int(rng.integers(0, 1500))))) for _ in range(400)]
    assert hash_uids(pa.array(strings)).tolist() == [_reference_hash(u) for u in strings]


def test_hashes_are_stable_and_slice_safe():
    arr = pa.array(["a", "abc", "", "uid-123", "abc"])
    h = hash_uids(arr)
    assert h[1] == h[4] and len(set(h[:4].tolist())) == 4
    # pinned: a change here silently breaks dedup across mmbalance versions
    assert int(hash_uids(pa.array(["abc"]))[0]) == int(h[1])
    assert hash_uids(arr.slice(1, 2)).tolist() == h[1:3].tolist()
    assert hash_uids(pa.chunked_array([arr[:2], arr[2:]])).tolist() == h.tolist()
    large = pa.array(["x" * 1000 + str(i) for i in range(100)], pa.large_string())
    assert len(set(hash_uids(large).tolist())) == 100


def test_sample_priority_is_the_salted_finaliser():
    uids = ["a", "uid-1", "x" * 1500, ""]
    for seed in (0, 12345, 2**64 + 3):
        salt = _splitmix64((seed % 2**64) * 0x9E3779B97F4A7C15 & MASK)
        assert sample_priority(pa.array(uids), seed).tolist() == [_finalise(_reference_hash(u) ^ salt) for u in uids]
        hashes = hash_uids(pa.array(uids))
        assert sample_priority_of_hashes(hashes, seed).tolist() == sample_priority(pa.array(uids), seed).tolist()
        assert hashes.tolist() == hash_uids(pa.array(uids)).tolist()  # the caller's hashes stay as they were
    assert sample_priority(pa.array(uids), 0).tolist() == [5472610599946147009, 3827420770621535150,
                                                           8253178748209636727, 15586148582901884014]


def test_uniforms_are_splitmix64_of_the_row_counter():
    key = shard_key(3, "s-1")
    assert int(key) == int.from_bytes(hashlib.sha256(b"3\0s-1").digest()[:8], "little")
    rows = np.arange(6)
    want = [(_splitmix64((r * 0x9E3779B97F4A7C15 & MASK) ^ int(key)) >> 11) / 2**53 for r in rows.tolist()]
    assert uniforms(key, rows).tolist() == want
    assert uniforms(key, rows[:4]).tolist() == [0.7762309234078765, 0.5833463766287317, 0.4232196678804585,
                                                0.11635014738290494]


def test_audit_priority_is_pinned():
    uids = ["a", "uid-1", ""]
    z = (7 * 0x9E3779B97F4A7C15 + 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 30)) * 0x94D049BB133111EB) & MASK
    salt = z ^ (z >> 31)
    want = []
    for u in uids:
        h = _reference_hash(u) ^ salt
        h = ((h ^ (h >> 31)) * 0xD6E8FEB86659FD93) & MASK
        h ^= h >> 32
        want.append(h >> 1)
    assert audit_priority(pa.array(uids), 7).tolist() == want == [499148793171265790, 4602235954315203461,
                                                                   5767853031902205552]


def test_blake2b_priority_is_pinned():
    assert blake2b_priority(["a", "b"], 3).tolist() == [2540490925208694253, 14227137856201882049]
