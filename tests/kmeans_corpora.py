"""Planted-cluster corpora on the unit sphere for judging k-means (issue 21 item 6).

None of these is the generator k-means was first tuned on (``planted_overlap`` in
tests/operators/test_kmeans.py). Five kinds, each with its own dimension, cluster sizes (Zipf
exponent 0 = uniform), overlap (``spread``: noise norm relative to the centre) and seed:

- ``vmf``: isotropic noise around centres spread uniformly over the sphere.
- ``elongated``: each cluster stretched along a few random directions of its own (rank ``rank``).
- ``cone``: CLIP-like: every row shares a mean direction (cos ~0.5 between random rows, the
  "narrow cone" of contrastive embeddings) and centres lie mostly in a low-dimensional subspace
  with a power-law spectrum; clusters are stretched too.
- ``nested``: topics, each holding several sub-clusters (the planted labels) close to each other.
- ``heavy``: Student-t noise (3 degrees of freedom) and 3% of rows scattered far from their centre.

``TUNING`` is what the k-means defaults were tuned on; ``HELD_OUT`` (other kinds, dimensions,
shapes and seeds) is what benchmarks/bench_kmeans_quality.py reports; ``TESTED`` (seeds of their
own, in neither list) is what tests/operators/test_kmeans.py checks against sklearn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def _unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def _sizes(rng: np.random.Generator, k: int, zipf: float) -> np.ndarray:
    p = np.arange(1, k + 1, dtype=np.float64) ** -zipf
    return rng.permutation(p / p.sum())


def _labels(rng: np.random.Generator, n: int, k: int, zipf: float) -> np.ndarray:
    # every planted cluster holds at least 2 rows, so ARI compares k real groups
    labels = rng.choice(k, size=n, p=_sizes(rng, k, zipf))
    labels[: 2 * k] = np.repeat(np.arange(k), 2)
    return rng.permutation(labels)


def _stretch(rng: np.random.Generator, k: int, d: int, rank: int, gain: float) -> np.ndarray:
    """(k, rank, d) random directions per cluster, scaled by a decaying gain."""
    basis = _unit(rng.normal(size=(k, rank, d)))
    return basis * (gain * np.arange(1, rank + 1) ** -0.5)[None, :, None]


@dataclass(frozen=True)
class Case:
    kind: str
    n: int
    k: int
    d: int
    zipf: float
    spread: float
    seed: int
    rank: int = 4  # directions a cluster is stretched along (elongated, cone)

    @property
    def name(self) -> str:
        return f"{self.kind}-n{self.n}-k{self.k}-d{self.d}-z{self.zipf:g}-s{self.spread:g}-seed{self.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}

    def make(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) unit float32 rows and their planted labels."""
        rng = np.random.default_rng([self.seed, sum(map(ord, self.kind))])
        n, k, d = self.n, self.k, self.d
        labels = _labels(rng, n, k, self.zipf)
        noise = rng.normal(size=(n, d)) / np.sqrt(d)
        if self.kind == "vmf":
            centres = _unit(rng.normal(size=(k, d)))
            x = centres[labels] + self.spread * noise
        elif self.kind == "elongated":
            centres = _unit(rng.normal(size=(k, d)))
            axes = _stretch(rng, k, d, self.rank, 2.0)
            along = np.einsum("nr,nrd->nd", rng.normal(size=(n, self.rank)), axes[labels])
            x = centres[labels] + self.spread * (0.5 * noise + along / np.sqrt(self.rank))
        elif self.kind == "cone":
            mean = _unit(rng.normal(size=d))
            spectrum = np.arange(1, d + 1) ** -0.8
            basis = np.linalg.qr(rng.normal(size=(d, d)))[0] * spectrum[None, :]
            offsets = rng.normal(size=(k, d)) @ basis.T
            centres = _unit(0.9 * mean + _unit(offsets))
            axes = _stretch(rng, k, d, self.rank, 1.5)
            along = np.einsum("nr,nrd->nd", rng.normal(size=(n, self.rank)), axes[labels])
            x = centres[labels] + self.spread * (0.6 * noise + along / np.sqrt(self.rank))
        elif self.kind == "nested":
            topics = max(2, int(round(np.sqrt(k))))
            top = _unit(rng.normal(size=(topics, d)))
            centres = _unit(top[rng.integers(0, topics, k)] + 1.2 * rng.normal(size=(k, d)) / np.sqrt(d))
            x = centres[labels] + self.spread * noise
        elif self.kind == "heavy":
            centres = _unit(rng.normal(size=(k, d)))
            t = noise / np.sqrt(rng.chisquare(3, size=(n, 1)) / 3)
            far = rng.random(n) < 0.03
            t[far] *= 4.0
            x = centres[labels] + self.spread * t
        else:
            raise ValueError(f"unknown corpus kind {self.kind!r}")
        return _unit(x).astype(np.float32), labels


def _grid(kinds, dims, shapes, seeds, n=20_000, k=36) -> list[Case]:
    return [Case(kind, n, k, d, zipf, spread, seed) for kind in kinds for d in dims for zipf, spread in shapes
            for seed in seeds]


# spreads chosen (from the planted partition alone, before any k-means ran) so that assigning each
# row to its planted cluster's spherical mean recovers the planted labels at ARI ~0.85-0.99:
# overlapping, yet the planted clustering is nearly the k-means optimum
TUNING: list[Case] = [
    *_grid(["vmf"], [32], [(0.0, 1.3), (1.0, 1.3)], [0, 1]),
    *_grid(["vmf"], [128], [(1.0, 2.8)], [0, 1]),
    *_grid(["elongated"], [64], [(0.5, 1.3), (1.2, 1.3)], [0, 1]),
    Case("vmf", 20_000, 8, 16, 1.0, 0.9, 2),
    Case("elongated", 20_000, 100, 64, 1.0, 1.2, 2),
]

HELD_OUT: list[Case] = [
    # the shape (36 planted, 20,000 x 64) from kinds never tuned on
    *_grid(["cone"], [64], [(0.0, 0.8), (1.0, 0.8)], [11, 12]),
    *_grid(["nested"], [64], [(0.0, 1.8), (1.0, 1.8)], [11, 12]),
    *_grid(["heavy"], [64], [(0.0, 1.1), (1.0, 1.1)], [11, 12]),
    # other dimensions, shapes and k; tuned-on kinds only with unseen dimensions and seeds
    Case("vmf", 20_000, 36, 16, 0.5, 1.0, 13),
    Case("vmf", 20_000, 36, 512, 1.3, 5.5, 14),
    Case("elongated", 20_000, 36, 256, 0.0, 2.2, 15),
    Case("elongated", 20_000, 20, 32, 1.5, 1.0, 16),
    Case("cone", 20_000, 60, 512, 1.0, 1.8, 17),
    Case("nested", 20_000, 64, 128, 0.5, 2.5, 18),
    Case("heavy", 20_000, 12, 256, 1.3, 2.3, 19),
]

# checked in the test suite: untuned kinds, seeds outside both lists above
TESTED: list[Case] = [
    Case("nested", 20_000, 36, 64, 1.0, 1.8, 21),  # the shape: 36 planted, 20,000 x 64
    Case("cone", 10_000, 24, 256, 1.0, 1.5, 23),
]
