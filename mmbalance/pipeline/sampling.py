"""The fit sample's priority cut-off, which the scan applies to every shard. The driver decides it
before any stage runs, so this module imports nothing heavy (the fit's faiss and scipy load only
when the fit runs, not while the workers scan)."""

from __future__ import annotations

import math

from mmbalance.schemas.recipe import Recipe

SAMPLE_OVERSAMPLING = 1.5
THRESHOLD_STEPS_PER_DOUBLING = 4


def sample_threshold(recipe: Recipe, total_rows: int) -> int | None:
    """Priority cut-off (uint64) keeping 1.5x to 1.8x the sample size in expectation; None: no
    sample needed. The share is rounded up to a power of 2^(1/4): it changes only when the corpus
    grows or shrinks by ~19%, and a grown corpus's lower cut-off is reached by narrowing the
    candidates already kept (``rebalance --update`` rescans no unchanged shard for it)."""
    if not recipe.needs_sample():
        return None
    share = SAMPLE_OVERSAMPLING * recipe.sample_size() / max(total_rows, 1) + 64 / max(total_rows, 1)
    if share >= 1.0:
        return 2**64 - 1
    share = 2.0 ** (math.ceil(THRESHOLD_STEPS_PER_DOUBLING * math.log2(share)) / THRESHOLD_STEPS_PER_DOUBLING)
    return 2**64 - 1 if share >= 1.0 else int(share * 2**64)
