"""Entrypoint for ``ray job submit``: run a recipe against the cluster the job runs on.

    ray job submit --runtime-env-json '{"pip": ["mmbalance"]}' -- \\
        python -m mmbalance.jobs.rebalance --recipe s3://bucket/recipe.yaml --out s3://bucket/run

Inside a job RAY_ADDRESS is set, so the pipeline connects to that cluster instead of starting one.
Exit status: 0 done, 2 bad input or recipe (one line on stderr), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmbalance.jobs.rebalance")
    parser.add_argument("--recipe", required=True, help="recipe path or URI")
    parser.add_argument("--out", required=True, help="output directory or URI")
    parser.add_argument("--input", default=None, help="shard directory or URI (default: recipe input.path)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    args = parser.parse_args(argv)

    from mmbalance.cli import _known_error
    from mmbalance.pipeline.rebalance import RunOptions, rebalance
    from mmbalance.schemas.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe)
        source = args.input or recipe.input.path
        if not source:
            raise SystemExit("mmbalance job failed: no input: pass --input or set input.path in the recipe")
        result = rebalance(source, args.out, recipe, RunOptions(executor=args.executor, overwrite=args.overwrite, show_progress=False))
    except Exception as exc:  # noqa: BLE001 - the job log gets one line, the status says why
        known = _known_error(exc)
        message = str(known or exc).strip().splitlines()[0] if str(known or exc).strip() else type(exc).__name__
        print(f"mmbalance job failed: {message}", file=sys.stderr, flush=True)
        return 2 if known is not None else 1
    rows, weights = result.report["rows"], result.report["weights"]
    print(json.dumps({"out": args.out, "rows": rows, "retention": weights["retention"], "stage_seconds": result.stage_seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
