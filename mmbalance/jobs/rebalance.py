"""Entrypoint for ``ray job submit``: run a recipe against the cluster the job runs on.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m mmbalance.jobs.rebalance --recipe recipe.yaml --input s3://bucket/shards --out s3://bucket/run

    ray job submit --runtime-env-json '{"pip": ["mmbalance"]}' -- \\
        python -m mmbalance.jobs.rebalance --recipe s3://bucket/recipe.yaml --out s3://bucket/run

``--recipe`` is a local path (relative to the job's working directory when ``--working-dir`` is
used) or a pyarrow filesystem URI; ``--out`` and ``--input`` are local paths or URIs (s3://,
gs://, file://). Inside a job RAY_ADDRESS is set, so the pipeline connects to that cluster instead of
starting one. The job log gets a line per stage as work finishes (at most one per ``--log-every``
seconds and stage), then one JSON line with the result.

Exit status: 0 done; 2 bad input or recipe; 1 any other failure. On failure the last line of the
job log is ``mmbalance job failed: <reason>`` (``ray job logs`` / ``ray job status`` show it).
A resubmitted job with the same ``--out`` resumes: finished shards are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


class StageLog:
    """Plain progress lines for job logs (no terminal there for progress bars)."""

    def __init__(self, every: float, stream=None):
        self.every = every
        self.stream = stream or sys.stdout
        self.units: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, summary: dict[str, Any]) -> None:
        now = time.monotonic()
        self.started.setdefault(stage, now)
        self.units[stage] = self.units.get(stage, 0) + 1
        self.rows[stage] = self.rows.get(stage, 0) + int(summary["rows_in"])  # every unit: the accounting schema
        if now - self.last.get(stage, float("-inf")) >= self.every:
            self.last[stage] = now
            elapsed = now - self.started[stage]
            print(
                f"mmbalance: {stage}: {self.units[stage]} units done in this run, {self.rows[stage]:,} rows, "
                f"{elapsed:.1f} s",
                file=self.stream,
                flush=True,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmbalance.jobs.rebalance")
    parser.add_argument("--recipe", required=True, help="recipe path or URI")
    parser.add_argument("--out", required=True, help="output directory or URI")
    parser.add_argument("--input", default=None, help="shard directory or URI (default: recipe input.path)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --out made from another recipe or input")
    parser.add_argument("--update", action="store_true",
                        help="the input changed since --out's run (same recipe): redo only what the added, changed or removed shards affect")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    parser.add_argument("--address", default=None, help="Ray address (default: the job's cluster, RAY_ADDRESS)")
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between progress lines per stage")
    parser.add_argument("--no-html", action="store_true", help="skip OUT/report.html")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from mmbalance.errors import known_error
    from mmbalance.pipeline.rebalance import RunOptions, rebalance
    from mmbalance.io.recipes import load_recipe

    try:
        recipe = load_recipe(args.recipe)
        source = args.input or recipe.input.path
        if not source:
            print("mmbalance job failed: no input: pass --input or set input.path in the recipe", file=sys.stderr, flush=True)
            return 2
        options = RunOptions(
            executor=args.executor,
            address=args.address,
            overwrite=args.overwrite,
            update=args.update,
            show_progress=False,
            html_report=not args.no_html,
            on_progress=StageLog(args.log_every),
        )
        result = rebalance(source, args.out, recipe, options)
    except Exception as exc:  # noqa: BLE001 - the job log gets one line, the status says why
        known = known_error(exc)
        text = str(known or exc).strip()
        message = text.splitlines()[0] if text else type(exc).__name__
        if known is None:
            message = f"{type(exc).__name__}: {message}"
        print(f"mmbalance job failed: {message}", file=sys.stderr, flush=True)
        return 2 if known is not None else 1
    rows, weights = result.report["rows"], result.report["weights"]
    print(json.dumps({"out": args.out, "rows": rows, "retention": weights["retention"], "stage_seconds": result.stage_seconds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
