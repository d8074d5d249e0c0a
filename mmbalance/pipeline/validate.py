"""``mmbalance validate``: the scan and duplicate stages of a run, into a scratch directory."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import Recipe


def validate_corpus(shard_dir: str, recipe: Recipe, examples: int = 5, show_progress: bool = True) -> dict[str, Any]:
    """What a run would reject, by reason, with example rows; nothing is written outside a temp dir."""
    # a hidden name: discovery skips it even when the input directory holds the temp dir
    with tempfile.TemporaryDirectory(prefix=".mmbalance-validate-") as scratch:
        result = rebalance(shard_dir, scratch, recipe, RunOptions(executor="local", stop_after="dedup", show_progress=show_progress))
        scans = result.report["scans"]
        reasons: dict[str, int] = defaultdict(int)
        for s in scans:
            for k, v in s["reasons"].items():
                reasons[k] += v
        if result.report["duplicates"]:
            reasons["duplicate uid"] += result.report["duplicates"]
        samples = []
        for name in sorted(os.listdir(os.path.join(scratch, "rejects", "validate"))):
            table = pq.read_table(os.path.join(scratch, "rejects", "validate", name))
            samples += table.slice(0, examples - len(samples)).to_pylist()
            if len(samples) >= examples:
                break
        rows = sum(s["rows_in"] for s in scans)
        rejected = sum(reasons.values())
        return {
            "shards_without_page_checksums": shards_without_page_checksums(shard_dir, recipe),
            "shards": len(scans),
            "rows": rows,
            "rejected": rejected,
            "valid": rows - rejected,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "examples": samples,
        }


def shards_without_page_checksums(shard_dir: str, recipe: Recipe) -> list[str]:
    """Relative paths of the shards whose pages carry no CRC (one page header read per shard)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmbalance.operators.source import has_page_checksums
    from mmbalance.pipeline.shards import discover_shards

    fs, shards = discover_shards(shard_dir, recipe.input.extensions)

    def check(shard) -> bool | None:
        with fs.open_input_file(shard.path) as handle:
            return has_page_checksums(handle)

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(check, shards))
    return [s.relpath for s, ok in zip(shards, found) if ok is False]
