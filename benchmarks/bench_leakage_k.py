"""Embedding leakage against the number of concept clusters M4 balances (issue 12's leakage table).

The corpus plants what labels alone miss: each row's image and text embeddings are the sum of an
occupation centre and a *scene* centre (``--scenes`` latent scenes, never given as a column), and
the scene depends on perceived gender. Balancing gender against occupations removes the part of
the leakage that goes through occupations; faiss concept clusters over the image embeddings can
find the scenes, and M4 association constraints against them remove the rest. For each k the run
is the same recipe (gender targets 50/50, [gender, occupation] associated, plus [gender, concept]
for k > 0) at a fixed retention; the table reports the report's leakage probes (logistic
regression on a held-out fifth of the fit sample) before and after.

    python benchmarks/bench_leakage_k.py --rows 100000 --ks 0 100 1000 10000

Writes benchmarks/results/leakage_k.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OCCUPATIONS = 30


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_corpus(directory: Path, rows: int, shards: int, scenes: int, dim: int, seed: int, noise: float) -> None:
    rng = np.random.default_rng([seed, 0])
    occ_centres = _unit(rng.normal(size=(OCCUPATIONS, dim)))
    scene_centres = _unit(rng.normal(size=(scenes, dim)))
    occ_share = np.arange(1, OCCUPATIONS + 1, dtype=np.float64) ** -1.0
    occ_share /= occ_share.sum()
    p_woman_occ = rng.uniform(0.15, 0.85, OCCUPATIONS)
    # scenes lean towards one gender: P(scene | woman) and P(scene | man) differ
    lean = rng.uniform(-1.0, 1.0, scenes)
    p_scene = {"woman": np.exp(1.2 * lean), "man": np.exp(-1.2 * lean), None: np.ones(scenes)}
    p_scene = {k: v / v.sum() for k, v in p_scene.items()}
    directory.mkdir(parents=True, exist_ok=True)
    per = rows // shards
    for s in range(shards):
        r = np.random.default_rng([seed, 1, s])
        occ = r.choice(OCCUPATIONS, per, p=occ_share)
        person = r.random(per) > 0.15
        woman = r.random(per) < p_woman_occ[occ]
        gender = np.where(person, np.where(woman, "woman", "man"), None)
        scene = np.empty(per, np.int64)
        for g in ("woman", "man", None):
            idx = np.flatnonzero(gender == g) if g is not None else np.flatnonzero(~person)
            scene[idx] = r.choice(scenes, len(idx), p=p_scene[g])
        base = occ_centres[occ] + 0.9 * scene_centres[scene]
        image = _unit(base + r.normal(0, noise / np.sqrt(dim), (per, dim)))
        text = _unit(base + r.normal(0, 1.3 * noise / np.sqrt(dim), (per, dim)))

        def fixed(m):
            return pa.FixedSizeListArray.from_arrays(pa.array(m.astype(np.float16).reshape(-1)), dim)

        table = pa.table({
            "uid": [f"{s:04d}{i:08d}" for i in range(per)],
            "image_emb": fixed(image), "text_emb": fixed(text),
            "gender": pa.array(gender.tolist(), pa.string()),
            "occupation": [f"occ{o:02d}" for o in occ],
        })
        pq.write_table(table, directory / f"part-{s:05d}.parquet", use_dictionary=["uid", "gender", "occupation"])


def recipe_for(k: int, retention: float, tol_a: float, sample: int) -> dict:
    associate = [["gender", "occupation"]] + ([["gender", "concept"]] if k else [])
    return {
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
        "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation", "source": "column", "column": "occupation"}],
        "clusters": [{"name": "concept", "embedding": "image", "k": k}] if k else [],
        "sample": {"size": sample, "seed": 0},
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": associate,
                    "tolerance": {"representation": 0.005, "association": tol_a}, "retention": retention,
                    "on_infeasible": "max_retention"},
        "report": {"html": False, "leakage": True, "leakage_rows": 20000},
        "export": {"seed": 0, "formats": ["parquet"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.5, help="norm of the image embedding noise (text: 1.3x)")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 100, 1000, 10000])
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--association", type=float, default=0.0005, help="eps_A, as a share of the carrying weight")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "leakage_k.json")
    args = parser.parse_args()

    from mmbalance.pipeline.rebalance import RunOptions, rebalance
    from mmbalance.schemas.recipe import parse_recipe

    work = Path(tempfile.mkdtemp(prefix="mmbalance-leakage-"))
    try:
        corpus = work / "corpus"
        write_corpus(corpus, args.rows, args.shards, args.scenes, args.dim, seed=0, noise=args.noise)
        results = []
        for k in args.ks:
            recipe = parse_recipe(recipe_for(k, args.retention, args.association, args.rows))
            t = time.perf_counter()
            result = rebalance(str(corpus), str(work / f"run-k{k}"), recipe,
                               RunOptions(executor="local", show_progress=False, html_report=False))
            seconds = time.perf_counter() - t
            report = result.report
            leak = report["leakage"]["gender"]
            row = {
                "k": k, "seconds": round(seconds, 2), "status": report["solution"].get("status"),
                "retention": report["weights"]["retention"], "ess": report["weights"]["ess"],
                "max_violation": report["solution"].get("max_violation"),
                "constraints": report["solution"].get("constraints"),
                "families": [{key: f.get(key) for key in ("family", "constraints", "at_tolerance", "worst_moment")}
                             for f in report.get("constraint_families", [])],
            }
            for feature in ("embedding_image", "embedding_text", "dataset"):
                views = leak.get(feature) or {}
                if views.get("before") and views.get("after"):
                    row[feature] = {"before": views["before"]["accuracy"], "after": views["after"]["accuracy"],
                                    "majority_before": views["before"]["majority_rate"],
                                    "majority_after": views["after"]["majority_rate"]}
            results.append(row)
            print(json.dumps({x: row[x] for x in ("k", "seconds", "status", "retention")}
                             | {f: row.get(f, {}) for f in ("embedding_image", "embedding_text")}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "command": "python " + " ".join(sys.argv),
        "rows": args.rows, "shards": args.shards, "latent_scenes": args.scenes, "dim": args.dim, "noise": args.noise,
        "retention": args.retention, "tolerance": {"representation": 0.005, "association": args.association},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
