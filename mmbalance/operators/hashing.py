"""Every hash a run keys something by, in one place: uid hashes (duplicates, the fit sample's
priority, the tagging audit's uid sample, evaluation pools) and the counter-based uniforms of the
stochastic rounding. Each value is written to disk or decides a draw, so each is pinned by a test
(tests/operators/test_hashing.py) against a plain-Python reference of the published algorithm.

The mixing step is splitmix64's finaliser (Steele, Lea and Flood 2014): xor-shift 30, multiply,
xor-shift 27, multiply, xor-shift 31. numpy's uint64 arithmetic wraps as the algorithm wants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (2^64 / golden ratio)
MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_VECTOR_BYTES = 1024  # uid bytes hashed by numpy; the rest of longer uids by a compiled loop
_MASK = 0xFFFFFFFFFFFFFFFF


def mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (which it returns)."""
    h ^= h >> np.uint64(30)
    h *= MIX1
    h ^= h >> np.uint64(27)
    h *= MIX2
    h ^= h >> np.uint64(31)
    return h


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One splitmix64 output per state: the finaliser of ``x + GOLDEN`` (a new array)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(x, np.uint64) + GOLDEN)


# -- uid hashes ---------------------------------------------------------------------------------


def _fnv1a_continue(starts: np.ndarray, ends: np.ndarray, data: np.ndarray, h: np.ndarray) -> None:
    """FNV-1a over data[starts[i]:ends[i]] onto the running hashes h (in place), compiled on first
    use: only uids longer than _VECTOR_BYTES get here, and numba's compiler costs a worker ~100 MB."""
    global _fnv1a_continue_jit
    if _fnv1a_continue_jit is None:
        import numba

        @numba.njit(cache=True, nogil=True)
        def kernel(starts, ends, data, h):
            for i in range(len(h)):
                x = h[i]
                for j in range(starts[i], ends[i]):
                    x = (x ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
                h[i] = x

        _fnv1a_continue_jit = kernel
    _fnv1a_continue_jit(starts, ends, data, h)


_fnv1a_continue_jit = None


def _fnv1a_mix(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """FNV-1a of each string, then the splitmix64 finaliser (FNV's low bits are weak, buckets use
    the high bits). Vectorised over strings one byte position at a time: rows sorted longest first,
    so the rows still going at position j are a prefix."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    starts = offsets[:-1][order]
    h = np.full(n, _FNV_OFFSET, np.uint64)
    steps = min(int(sorted_lengths[0]) if n else 0, _VECTOR_BYTES)
    going = np.searchsorted(-sorted_lengths, -np.arange(steps), side="left")  # rows longer than j
    for j in range(steps):
        head = h[: going[j]]
        head ^= data[starts[: going[j]] + j]
        head *= _FNV_PRIME  # uint64 arrays wrap, as FNV wants
    longer = int(np.count_nonzero(sorted_lengths > _VECTOR_BYTES))
    if longer:
        _fnv1a_continue(starts[:longer] + _VECTOR_BYTES, starts[:longer] + sorted_lengths[:longer], data, h[:longer])
    mix64(h)
    out = np.empty(n, np.uint64)
    out[order] = h
    return out


def hash_uids(uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hashes of uid strings (same value on every machine and version)."""
    arr = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
    arr = pc.cast(arr, pa.large_string())
    if len(arr) == 0:
        return np.empty(0, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return _fnv1a_mix(offsets, data)


def sample_priority(uids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """Uniform uint64 priority per uid for the fit sample (bottom-k): a function of (uid, seed)
    only, so every shard agrees."""
    return sample_priority_of_hashes(hash_uids(uids), seed)


def sample_priority_of_hashes(uid_hashes: np.ndarray, seed: int) -> np.ndarray:
    """``sample_priority`` from the uids' ``hash_uids`` (a new array; the hashes are not changed)."""
    salt = splitmix64(np.array([int(seed) % 2**64], np.uint64) * GOLDEN)
    return mix64(uid_hashes ^ salt)


def _audit_salt(seed: int) -> int:
    # splitmix64 with its first multiply-step left out: kept as it was, the audit samples on disk depend on it
    z = (seed * 0x9E3779B97F4A7C15 + 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 30)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def audit_priority(uids: pa.Array | pa.ChunkedArray, seed: int) -> np.ndarray:
    """The tagging audit's per-uid order key (63 bits, JSON- and int64-safe): the seed changes the
    order, not just a bit pattern (a second remix after the salt)."""
    h = hash_uids(uids) ^ np.uint64(_audit_salt(seed))
    h = (h ^ (h >> np.uint64(31))) * np.uint64(0xD6E8FEB86659FD93)
    h ^= h >> np.uint64(32)
    h >>= np.uint64(1)
    return h


def blake2b_priority(uids: Sequence[str], seed: int) -> np.ndarray:
    """Evaluation pools' order key per uid: the first 8 bytes of blake2b(f"{seed}:{uid}"),
    big-endian (independent of row order, so a pool is the same whatever the file layout)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{u}".encode(), digest_size=8).digest(), "big")
                     for u in uids], dtype=np.uint64)


# -- the stochastic rounding's draws --------------------------------------------------------------


def shard_key(seed: int, shard_id: str) -> np.uint64:
    """A shard's key for its rows' draws: 64 bits of sha256(seed, shard id)."""
    digest = hashlib.sha256(f"{seed}\0{shard_id}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def uniforms(key: np.uint64, rows: np.ndarray) -> np.ndarray:
    """u in [0, 1) per row, a pure function of (key, row)."""
    with np.errstate(over="ignore"):
        bits = splitmix64(rows.astype(np.uint64) * GOLDEN ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
