"""Do two revisions of mmbalance produce the same runs? Exit 1 on any difference.

Runs ``mmbalance rebalance`` from a base revision (a commit, unpacked with ``git archive``) and from
a source tree (default: this working tree) on the same corpora and recipes, on each executor, and
compares what the runs wrote: every manifest's (uid, weight, repeats) and its bytes, report.json
and stats/stages.json without their timing fields, and every other file of the run (the done markers
without their timings; report.html, which carries them, and the lock left out). The solve's
diagnostics record its seconds, so solution.json's checksum and digest (in the weigh markers) differ
between any two runs: solution.json is compared without its timings instead.

    python scripts/compare_runs.py --base 20b1f5a --work /tmp/compare
    python scripts/compare_runs.py --work /tmp/compare --cases demo --executors local --reuse-base
    python scripts/compare_runs.py --base b779166 --work /tmp/compare --tables   # a deliberate re-encoding

``--tables``: a Parquet file whose bytes differ passes when its table does (schema and values, the
run's packed embedding columns unpacked as the pipeline reads them), and the done markers' size and
checksum of Parquet files are not compared: for a change of how files are encoded, not of what they
hold. The manifests' (uid, weight, repeats) are compared either way.

Cases (corpora from ``mmbalance synth``, generated once under --work):
    demo      the demo: 20k rows in 8 shards, caption tags, a k=60 image cluster, a cap, M4 with
              per-label parity and image-embedding moments (the row-block streaming path)
    tags200k  200k rows in 8 shards (no image bytes): caption tags, a k=100 image cluster, a cap by
              cluster, M4 with per-label parity (a utility column, which a composed M4 step reads per
              signature), a k=40 text cluster with a level above it
    utility50k 50k rows in 8 shards: M4 alone with a per-row utility (the signature-block streaming
              path: a task per shard per dual evaluation), per-label parity, a k=100 image cluster
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]

TAGS200K_RECIPE = {
    "input": {"columns": {"uid": "uid", "caption": "caption", "image_embedding": "image_emb", "text_embedding": "text_emb",
                          "utility": "clip_score"}},
    "attributes": [{"name": "gender", "source": "caption", "caption": {"vocabulary": "perceived_gender"},
                    "values": ["woman", "man"]}],
    "labels": [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}],
    "clusters": [{"name": "concept", "embedding": "image", "k": 100},
                 {"name": "theme", "embedding": "text", "k": 40, "levels": [8]}],
    "balance": [
        {"method": "cap", "by": "concept", "cap": 2500},
        {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
         "associate": [["gender", "occupation"], ["gender", "concept"]],
         "tolerance": {"representation": 0.002, "association": 0.005, "association_per_label": 0.05},
         "retention": 0.6, "on_infeasible": "max_retention"},
    ],
    "report": {"html": False},
    "export": {"seed": 0, "formats": ["parquet"]},
}

UTILITY_RECIPE = {  # M4 alone with a per-row utility: the signature-block streaming path (a Ray task per shard per pass)
    "input": {"columns": {"uid": "uid", "caption": "caption", "image_embedding": "image_emb", "utility": "clip_score"}},
    "attributes": TAGS200K_RECIPE["attributes"],
    "labels": TAGS200K_RECIPE["labels"],
    "clusters": [{"name": "concept", "embedding": "image", "k": 100}],
    "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}},
                "associate": [["gender", "occupation"], ["gender", "concept"]],
                "tolerance": {"representation": 0.002, "association": 0.005, "association_per_label": 0.05},
                "retention": 0.6, "max_weight": 3.0, "on_infeasible": "max_retention"},
    "report": {"html": False},
}

CASES = {"demo": (20_000, 8, True), "tags200k": (200_000, 8, False), "utility50k": (50_000, 8, False)}  # rows, shards, images
TIMING_KEYS = ("seconds", "slowest", "rows_per_second")
SKIPPED = {".lock", "report.html"}


def recipe_of(case: str) -> dict:
    if case == "demo":
        sys.path.insert(0, str(ROOT))
        from mmbalance.synth import DEMO_RECIPE

        return DEMO_RECIPE
    return {"tags200k": TAGS200K_RECIPE, "utility50k": UTILITY_RECIPE}[case]


def env_for(source: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0"}


def unpack(rev: str, work: Path) -> Path:
    """The base revision's source tree (git archive), unpacked once."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    dest = work / f"src-{sha[:12]}"
    if not (dest / "mmbalance").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def corpus(case: str, work: Path) -> Path:
    rows, shards, images = CASES[case]
    path = work / "corpora" / case
    if not (path / ".done").exists():
        shutil.rmtree(path, ignore_errors=True)
        args = [sys.executable, "-m", "mmbalance.cli", "synth", str(path), "--rows", str(rows), "--shards", str(shards)]
        subprocess.run(args + ([] if images else ["--no-images"]), env=env_for(ROOT), check=True, capture_output=True)
        (path / ".done").write_text("")
    return path


def run(source: Path, case: str, executor: str, work: Path, side: str, reuse: bool) -> tuple[Path, float | None]:
    out = work / "runs" / case / executor / side
    if reuse and (out / "report.json").exists():
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    recipe = work / "recipes" / f"{case}.json"  # JSON is YAML: the recipe loader reads it
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(json.dumps(recipe_of(case)))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mmbalance.cli", "rebalance", str(corpus(case, work)), "--out", str(out),
                           "--recipe", str(recipe), "--executor", executor, "--quiet"],
                          env=env_for(source), capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {case} {executor}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return out, round(time.perf_counter() - start, 1)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def outputs(run_dir: Path, tables: bool = False) -> dict[str, bytes]:
    """Every file of a run by path; JSON files (report, stage statistics, done markers) without timings
    (``tables``: nor the markers' records of Parquet files)."""
    found = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if not path.is_file() or rel in SKIPPED:
            continue
        data = path.read_bytes()
        if rel.endswith(".json"):
            value = without_timings(json.loads(data))
            if rel.startswith("_done/"):  # the records of JSON files with timings (compared above, without them)
                value = {k: v for k, v in value.items() if k != "solution_digest"}
                value["_outputs"] = {f: r for f, r in value.get("_outputs", {}).items()
                                     if not f.endswith(".json") and not (tables and f.endswith(".parquet"))}
            data = json.dumps(value, sort_keys=True, indent=1).encode()
        found[rel] = data
    return found


def manifest_difference(a: Path, b: Path) -> str | None:
    left, right = pq.read_table(a, columns=["uid", "weight", "repeats"]), pq.read_table(b, columns=["uid", "weight", "repeats"])
    if left.num_rows != right.num_rows:
        return f"{left.num_rows} rows against {right.num_rows}"
    for name in ("uid", "weight", "repeats"):
        if not left.column(name).equals(right.column(name)):
            return f"column {name} differs"
    return None


def json_difference(a: bytes, b: bytes, limit: int = 5) -> list[str]:
    """The first paths at which two JSON documents differ."""
    out: list[str] = []

    def walk(x, y, path):
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    out.append(f"{path}/{k}: only in {'head' if k not in x else 'base'}")
                else:
                    walk(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif x != y:
            out.append(f"{path}: {json.dumps(x)[:120]} != {json.dumps(y)[:120]}")

    walk(json.loads(a), json.loads(b), "")
    return out


def table_difference(a: Path, b: Path) -> str | None:
    """None when two Parquet files hold the same table (packed embedding columns unpacked)."""
    sys.path.insert(0, str(ROOT))
    from mmbalance.io.store import unpack_float_lists

    left, right = (unpack_float_lists(pq.read_table(p)) for p in (a, b))
    if not left.schema.equals(right.schema):
        return f"schemas differ: {left.schema} != {right.schema}"
    return None if left.equals(right) else "tables differ"


def compare(base: Path, head: Path, tables: bool = False) -> list[str]:
    left, right = outputs(base, tables), outputs(head, tables)
    problems = [f"only in base: {rel}" for rel in sorted(set(left) - set(right))]
    problems += [f"only in head: {rel}" for rel in sorted(set(right) - set(left))]
    manifests = 0
    for rel in sorted(set(left) & set(right)):
        if rel.startswith("manifest/"):
            manifests += 1
            why = manifest_difference(base / rel, head / rel)
            if why:
                problems.append(f"{rel}: (uid, weight, repeats) {why}")
        if left[rel] != right[rel] and tables and rel.endswith(".parquet"):
            why = table_difference(base / rel, head / rel)
            if why:
                problems.append(f"{rel}: {why}")
        elif left[rel] != right[rel]:
            detail = "; ".join(json_difference(left[rel], right[rel])) if rel.endswith(".json") else "bytes differ"
            problems.append(f"{rel}: {detail}")
    if manifests == 0:
        problems.append("no manifest files compared")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="20b1f5a", help="git revision to compare against (default: %(default)s)")
    parser.add_argument("--head", type=Path, default=ROOT, help="source tree to compare (default: this working tree)")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory: sources, corpora, runs")
    parser.add_argument("--cases", default="demo,tags200k,utility50k", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--reuse-base", action="store_true", help="keep the base's finished runs from an earlier call")
    parser.add_argument("--tables", action="store_true", help="Parquet files pass when their tables are equal (see above)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_src = unpack(args.base, work)
    failed = False
    summary = []
    for case in args.cases.split(","):
        for executor in args.executors.split(","):
            base_out, base_s = run(base_src, case, executor, work, "base", args.reuse_base)
            head_out, head_s = run(args.head.resolve(), case, executor, work, "head", False)
            problems = compare(base_out, head_out, args.tables)
            files = len(outputs(head_out))
            status = "identical" if not problems else f"{len(problems)} differences"
            print(f"{case} {executor}: {status} ({files} files; command seconds base {base_s}, head {head_s})", flush=True)
            for line in problems[:40]:
                print(f"  {line}")
            failed |= bool(problems)
            summary.append({"case": case, "executor": executor, "identical": not problems, "files": files,
                            "base_seconds": base_s, "head_seconds": head_s})
    (work / "compare.json").write_text(json.dumps({"base": args.base, "head": str(args.head), "tables": args.tables, "runs": summary},
                                                  indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
