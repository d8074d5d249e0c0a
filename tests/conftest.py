"""Shared fixtures: environment for Ray/numba, held-out corpus writers, one Ray session."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# keep test clusters on loopback: Ray 2.60 otherwise binds GCS and raylet on the machine's address
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mmbalance-numba-cache"))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards  # noqa: E402


@pytest.fixture
def issue_recipe(tmp_path: Path):
    from mmbalance.io.recipes import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_FROM_ISSUE)
    return load_recipe(path)


@pytest.fixture
def held_out_corpus(tmp_path: Path) -> Path:
    """Four shards in nested directories, variable-length float32 embedding lists."""
    tables = {f"part={i // 2}/shard-{i}.parquet": held_out_table(3000 + 250 * i, seed=100 + i) for i in range(4)}
    return write_shards(tmp_path / "corpus", tables)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting Ray costs ~5 s)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
