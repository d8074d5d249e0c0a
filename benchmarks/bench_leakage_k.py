"""Embedding leakage against what M4 balances (issue 12's leakage table, issue 21's constraint families).

The corpus plants what labels alone miss: each row's image and text embeddings are the sum of an
occupation centre and a *scene* centre (``--scenes`` latent scenes, never given as a column), and
the scene depends on perceived gender. Balancing gender against occupations removes the part of
the leakage that goes through occupations; faiss concept clusters over the image embeddings can
find the scenes, and M4 constraints against them remove more; moments against the image
embedding's principal components remove what varies inside clusters. For each k and mode the run
is the same recipe (gender targets 50/50, [gender, occupation] associated) at a fixed retention:

    global      the global association bound eps_A on [gender, occupation] and [gender, concept]
    per_label   per-label parity eps_P on [gender, occupation] and [gender, concept] (no global bound)
    embedding   eps_A on [gender, occupation], and [gender, embedding.image] at eps_E (no concepts)
    combined    per-label parity on occupation and concept, plus image-embedding moments
    combined_both   combined, plus text-embedding moments

The table reports the report's leakage probes (logistic regression on a held-out fifth of the fit
sample) before and after, binding constraints per family, retention, ESS and run seconds. The
report's held-out rows were themselves balanced, and a bound held exactly in-sample reads *below*
the majority rate there; so each run is also probed out of sample: ``--fresh-rows`` more rows from
the same generator (never balanced), tagged and weighted by the run's own solution (concepts by its
centroids), with a probe trained on the balanced sample and one trained on half the fresh rows,
both scored on fresh rows.

    python benchmarks/bench_leakage_k.py --rows 100000 --ks 0 100 1000 10000
    python benchmarks/bench_leakage_k.py --rows 100000 --ks 1000 --modes global per_label embedding combined combined_both \
        --association 0.00005 --per-label 0.02 --embedding 0.0 --out benchmarks/results/leakage_families.json

Writes benchmarks/results/leakage_k.json (or ``--out``).
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


def recipe_for(k: int, retention: float, tol_a: float, sample: int, mode: str = "global", per_label: float = 0.02,
               embedding: float = 0.0, components: int = 64, min_support: int = 50) -> dict:
    concepts = [["gender", "concept"]] if k and mode != "embedding" else []
    associate = [["gender", "occupation"]] + concepts
    tolerance: dict = {"representation": 0.005, "association": tol_a}
    if mode in ("per_label", "combined", "combined_both"):
        tolerance.update(association=None, association_per_label=per_label)
    if mode in ("embedding", "combined", "combined_both"):
        associate.append(["gender", "embedding.image"])
        tolerance["association_embedding"] = embedding
    if mode == "combined_both":
        associate.append(["gender", "embedding.text"])
    return {
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
        "attributes": [{"name": "gender", "source": "column", "column": "gender", "values": ["woman", "man"]}],
        "labels": [{"name": "occupation", "source": "column", "column": "occupation"}],
        "clusters": [{"name": "concept", "embedding": "image", "k": k}] if concepts else [],
        "sample": {"size": sample, "seed": 0},
        "balance": {"method": "m4", "targets": {"gender": {"woman": 0.5, "man": 0.5}}, "associate": associate,
                    "tolerance": tolerance, "retention": retention, "on_infeasible": "max_retention",
                    "min_support": min_support, "embedding_components": components},
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
    parser.add_argument("--modes", nargs="+", default=["global"],
                        choices=["global", "per_label", "embedding", "combined", "combined_both"])
    parser.add_argument("--per-label", type=float, default=0.02, help="eps_P: |P_w(gender | label value) - 1/2|")
    parser.add_argument("--embedding", type=float, default=0.0, help="eps_E, in sd of each principal component")
    parser.add_argument("--components", type=int, default=64, help="principal components of the image embedding")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--fresh-rows", type=int, default=100_000, help="rows drawn for the out-of-sample probes (0: none)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "leakage_k.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmbalance-leakage-"))
    try:
        corpus, fresh = work / "corpus", work / "fresh"
        # one draw of rows + fresh rows with the same generator: the first shards are the corpus
        extra = -(-args.fresh_rows // (args.rows // args.shards)) if args.fresh_rows else 0
        write_corpus(work / "all", args.rows // args.shards * (args.shards + extra), args.shards + extra, args.scenes,
                     args.dim, seed=args.seed, noise=args.noise)
        for directory, shards in ((corpus, range(args.shards)), (fresh, range(args.shards, args.shards + extra))):
            directory.mkdir()
            for i in shards:
                (work / "all" / f"part-{i:05d}.parquet").rename(directory / f"part-{i:05d}.parquet")
        args.fresh = fresh if extra else None
        results = []
        for k in args.ks:
            for mode in args.modes:
                if mode == "embedding" and k != args.ks[0]:
                    continue  # no concept clusters: the same run for every k
                results.append(run_one(work, corpus, k, mode, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "command": "python " + " ".join(sys.argv),
        "rows": args.rows, "shards": args.shards, "latent_scenes": args.scenes, "dim": args.dim, "noise": args.noise,
        "seed": args.seed, "retention": args.retention,
        "tolerance": {"representation": 0.005, "association": args.association, "association_per_label": args.per_label,
                      "association_embedding": args.embedding, "embedding_components": args.components},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def run_one(work: Path, corpus: Path, k: int, mode: str, args) -> dict:
    from mmbalance.pipeline.rebalance import RunOptions, rebalance
    from mmbalance.schemas.recipe import parse_recipe

    recipe = parse_recipe(recipe_for(k, args.retention, args.association, args.rows, mode, args.per_label, args.embedding,
                                     args.components))
    t = time.perf_counter()
    result = rebalance(str(corpus), str(work / f"run-k{k}-{mode}"), recipe,
                       RunOptions(executor="local", show_progress=False, html_report=False))
    seconds = time.perf_counter() - t
    report = result.report
    leak = report["leakage"]["gender"]
    solution = report["solution"]
    row = {
        "k": k, "mode": mode, "seconds": round(seconds, 2), "solve_seconds": report["stage_seconds"].get("solve"),
        "status": solution.get("status"), "retention": report["weights"]["retention"], "ess": report["weights"]["ess"],
        "max_violation": solution.get("max_violation"), "constraints": solution.get("constraints"),
        "binding": solution.get("binding_constraints"), "dual_evaluations": solution.get("solver", {}).get("dual_evaluations"),
        "largest_feasible_retention": solution.get("largest_feasible_retention"),
        "families": [{key: f.get(key) for key in ("family", "constraints", "at_tolerance", "worst_moment")}
                     for f in report.get("constraint_families", [])],
    }
    for feature in ("embedding_image", "embedding_text", "dataset"):
        views = leak.get(feature) or {}
        if views.get("before") and views.get("after"):
            row[feature] = {"before": views["before"]["accuracy"], "after": views["after"]["accuracy"],
                            "majority_before": views["before"]["majority_rate"],
                            "majority_after": views["after"]["majority_rate"],
                            "excess_after": views["after"]["accuracy"] - views["after"]["majority_rate"],
                            "test_rows": views["after"].get("test_rows")}
    if args.fresh is not None:
        row["fresh"] = fresh_probes(work / f"run-k{k}-{mode}", args.fresh, k and mode != "embedding")
    print(json.dumps({x: row[x] for x in ("k", "mode", "seconds", "status", "retention", "binding")}
                     | {f: round(row.get(f, {}).get("excess_after", float("nan")), 4) for f in ("embedding_image", "embedding_text")}
                     | {"fresh": row.get("fresh")}), flush=True)
    return row


def _unit_rows(column) -> np.ndarray:
    x = np.asarray(column.combine_chunks().values.to_numpy(zero_copy_only=False), np.float64).reshape(len(column), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fresh_probes(out: Path, fresh: Path, concepts: bool) -> dict:
    """Probe excess over the weighted majority rate on rows the run never saw, weighted by its own
    solution: trained on the run's balanced fit sample, and trained on half of the fresh rows."""
    from sklearn.linear_model import LogisticRegression

    from mmbalance.operators.solve import solution_from_dict

    solution = solution_from_dict(json.loads((out / "solve" / "solution.json").read_text()))
    table = pa.concat_tables([pq.read_table(p) for p in sorted(fresh.glob("*.parquet"))])
    table = table.rename_columns([f"tag.{c}" if c in ("gender", "occupation") else c for c in table.column_names])
    if concepts:  # the run's concept of each fresh row: nearest centroid by inner product, as the assign stage
        centroids = np.load(out / "models" / "concept.npy").astype(np.float64)
        ids = np.argmax(_unit_rows(table.column("image_emb")) @ centroids.T, axis=1)
        table = table.append_column("tag.concept", pa.array([str(i) for i in ids]))
    # a fresh row whose tags no corpus row had has no solved weight: left out (counted)
    import polars as pl

    keys = pl.DataFrame({c: pl.Series(c, solution.keys[c], dtype=pl.String) for c in solution.key_columns})
    seen = pl.from_arrow(table.select(solution.key_columns)).with_row_index("__i").join(
        keys, on=solution.key_columns, how="semi", nulls_equal=True)["__i"].to_numpy()
    unseen = table.num_rows - len(seen)
    table = table.take(pa.array(np.sort(seen)))
    weights = solution.weights(table)
    sample = pq.read_table(out / "fit" / "sample.parquet")
    sample_weights = solution.weights(sample)
    gender = np.array(table.column("tag.gender").to_pylist(), dtype=object)
    keep = gender != None  # noqa: E711 - an object array compares elementwise
    y, w = (gender[keep] == "woman").astype(int), weights[keep]
    s_gender = np.array(sample.column("tag.gender").to_pylist(), dtype=object)
    s_keep = s_gender != None  # noqa: E711
    out_probes = {}
    for side in ("image", "text"):
        x = _unit_rows(table.column(f"{side}_emb"))[keep]
        xs = _unit_rows(sample.column(f"{side}_emb"))[s_keep]

        def excess(model, rows) -> float:
            correct = model.predict(x[rows]) == y[rows]
            shares = np.bincount(y[rows], weights=w[rows], minlength=2) / w[rows].sum()
            return float((correct * w[rows]).sum() / w[rows].sum() - shares.max())

        everything, half = np.arange(len(y)), len(y) // 2
        from_sample = LogisticRegression(max_iter=300).fit(xs, (s_gender[s_keep] == "woman").astype(int),
                                                            sample_weight=sample_weights[s_keep])
        from_fresh = LogisticRegression(max_iter=300).fit(x[:half], y[:half], sample_weight=w[:half])
        out_probes[side] = {"trained_on_sample": excess(from_sample, everything),
                            "trained_on_fresh_half": excess(from_fresh, everything[half:]), "rows": int(len(y)),
                            "rows_with_unseen_tags": int(unseen)}
    return out_probes


if __name__ == "__main__":
    main()
