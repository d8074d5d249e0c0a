"""``mmbalance validate``: the stages of a run up to the duplicate check, into a scratch directory, so
it rejects what ``rebalance`` rejects: the scan's reasons, and with an ``embed`` section the embed
stage's (undecodable, truncated, missing images; captions) checked without loading or running the
model, and duplicates counted as the run counts them (a copy rejected for its image is rejected once)."""

from __future__ import annotations

import tempfile
from typing import Any

import pyarrow.compute as pc

from mmbalance.io.source import read_source, shard_info
from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.io.store import RunStore, resolve_filesystem
from mmbalance.schemas.contract import add_reasons
from mmbalance.schemas.recipe import Recipe

STATUS = "status"  # img2dataset's download status column


def validate_corpus(shard_dir: str, recipe: Recipe, examples: int = 5, show_progress: bool = True) -> dict[str, Any]:
    """What a run would reject, by reason, with example rows; nothing is written outside a temp dir."""
    # a hidden name: discovery skips it even when the input directory holds the temp dir
    with tempfile.TemporaryDirectory(prefix=".mmbalance-validate-") as scratch:
        result = rebalance(shard_dir, scratch, recipe, RunOptions(executor="local", stop_after="dedup", show_progress=show_progress))
        scans, embeds = result.report["scans"], result.report["embeds"]
        reasons = add_reasons({}, *(s["reasons"] for s in [*scans, *embeds]))
        if result.report["duplicates"]:
            add_reasons(reasons, {"duplicate uid": result.report["duplicates"]})
        store = RunStore(scratch)
        samples: list[dict[str, Any]] = []
        for stage in ("validate", "embed"):
            for name in store.list_files("rejects", stage, suffix=".parquet"):
                if len(samples) >= examples:
                    break
                samples += store.read_table("rejects", stage, name).slice(0, examples - len(samples)).to_pylist()
        rows = sum(s["rows_in"] for s in scans)
        rejected = sum(reasons.values())
        run = store.read_json("run.json")
        return {
            "shards_without_page_checksums": shards_without_page_checksums(shard_dir, recipe),
            "shards": len(scans),
            "rows": rows,
            "rejected": rejected,
            "valid": rows - rejected,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "examples": samples,
            "notes": _unmapped_status(shard_dir, store.read_json("shards.json"), run),
        }


def shards_without_page_checksums(shard_dir: str, recipe: Recipe) -> list[str]:
    """Relative paths of the shards whose pages carry no CRC (one page header read per shard)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmbalance.io.source import has_page_checksums
    from mmbalance.pipeline.shards import discover_shards

    fs, shards = discover_shards(shard_dir, recipe.input.extensions, recipe.input.format)

    def check(shard) -> bool | None:
        if shard.format != "parquet":  # a tar has no pages
            return None
        with fs.open_input_file(shard.path) as handle:
            return has_page_checksums(handle)

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(check, shards))
    return [s.relpath for s, ok in zip(shards, found) if ok is False]


def _unmapped_status(shard_dir: str, shards: list[dict[str, Any]], run: dict[str, Any]) -> list[str]:
    """A note when the shards have img2dataset's status column with failed rows but the recipe maps
    no status: those rows are not rejected for it (only, perhaps, for their missing image)."""
    recipe = Recipe.model_validate(run["recipe"])
    if recipe.input.columns.status:
        return []
    fs, _ = resolve_filesystem(shard_dir)
    failed = 0
    for s in shards:
        fmt = s.get("format", "auto")
        if STATUS not in shard_info(fs, s["path"], s["relpath"], fmt)[0].names:
            continue
        for table in read_source(fs, s["path"], s["relpath"], [STATUS], recipe.execution.batch_rows, fmt):
            ok = pc.fill_null(pc.equal(table.column(STATUS).cast("string"), "success"), False)
            failed += table.num_rows - (pc.sum(ok).as_py() or 0)
    if not failed:
        return []
    rows = f"{failed:,} row{'s' if failed != 1 else ''}"
    return [f"{rows} {'have' if failed != 1 else 'has'} a status other than 'success' in column '{STATUS}' "
            f"(img2dataset's download status), which the recipe does not map: set input.columns.status: {STATUS} "
            "to reject them with img2dataset's reason"]
