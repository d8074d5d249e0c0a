"""Tables and data-side figures for bench_model_bias.py: what the balanced data holds (from the
run's report and the corpus's ground truth) and what the models trained on it show (mean and
95% t-interval across training seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# figure key -> column title; the model figures come from the evaluation of each checkpoint
MODEL_FIGURES = {
    "accuracy": "occupation acc", "cue_accuracy": "cue acc", "rb": "RB", "ab": "AB occupation",
    "ab_scene": "AB scene (latent)", "ab_null": "AB occupation, labels shuffled",
    "ab_scene_null": "AB scene, labels shuffled", "skew_correlation": "corr(share, planted)",
    "maxskew@10": "MaxSkew@10", "maxskew@100": "MaxSkew@100",
    "ndkl": "NDKL", "i2t_r@1": "I->T R@1", "t2i_r@1": "T->I R@1", "i2t_r@5": "I->T R@5", "t2i_r@5": "T->I R@5",
}
TABLE_COLUMNS = ("accuracy", "cue_accuracy", "rb", "ab", "skew_correlation", "ab_scene", "maxskew@10", "maxskew@100", "ndkl",
                 "i2t_r@1", "t2i_r@1")
README_COLUMNS = ("accuracy", "cue_accuracy", "rb", "ab", "ab_scene", "maxskew@100", "ndkl", "i2t_r@1")


def _gap(shares: dict[str, float], overall: float) -> float:
    return max(abs(v - overall) for v in shares.values()) if shares else 0.0


def data_side(run_dir: Path, corpus: Path) -> dict:
    """Retention, the report's RB/AB before and after, and the ground-truth association the
    balanced data still holds with the occupation and with the latent scene (realised repeats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    report = json.loads((run_dir / "report.json").read_text())
    truth = pq.read_table(corpus, columns=["uid", "gender", "occupation", "scene"])
    manifest = pa.concat_tables([pq.read_table(p, columns=["uid", "repeats"]) for p in sorted((run_dir / "manifest").glob("*.parquet"))])
    joined = truth.join(manifest, "uid")
    rep = np.asarray(joined.column("repeats").to_numpy(zero_copy_only=False), dtype=np.float64)
    woman = np.asarray([g == "woman" for g in joined.column("gender").to_pylist()])

    def shares(column: str) -> dict[str, float]:
        values = np.asarray(joined.column(column).to_pylist())
        return {v: float(rep[(values == v) & woman].sum() / rep[values == v].sum()) for v in sorted(set(values)) if rep[values == v].sum() > 0}

    overall = float(rep[woman].sum() / rep.sum())
    by_occ, by_scene = shares("occupation"), shares("scene")
    sol = report.get("solution") or {}
    return {
        "rows": int(len(rep)), "kept_rows": int((rep > 0).sum()), "samples": int(rep.sum()),
        "retention": float(rep.sum() / len(rep)),
        "solver_status": sol.get("status") or sol.get("outcome"),
        "largest_feasible_retention": sol.get("largest_feasible_retention"),
        "report_rb_before": report["before"]["rb"], "report_ab_before": report["before"]["ab"],
        "report_rb_after": report["after_realized"]["rb"], "report_ab_after": report["after_realized"]["ab"],
        "woman_share": overall,
        "ab_occupation": _gap(by_occ, overall), "ab_scene": _gap(by_scene, overall),
        "woman_share_by_occupation": by_occ, "woman_share_by_scene": by_scene,
    }


def _interval(values: list[float]) -> dict:
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "values": v.tolist()}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v)))
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "values": v.tolist()}


def _figures(run: dict) -> dict:
    """evaluate's figures, plus the shuffled-label floors only the numpy recomputation has."""
    return {**{k: run["numpy"][k] for k in ("ab_null", "ab_scene_null") if k in run["numpy"]}, **run["evaluate"]}


def aggregate(runs: dict) -> dict:
    by_config: dict[str, list[dict]] = {}
    for run in runs.values():
        by_config.setdefault(run["config"], []).append(run)
    table = {}
    for config, members in by_config.items():
        row = {k: _interval([_figures(r)[k] for r in members]) for k in MODEL_FIGURES if k in _figures(members[0])}
        row["seeds"] = len(members)
        row["train_seconds"] = _interval([r["train_seconds"] for r in members])
        if "loop" in members[0]:
            row["mixer_share"] = _interval([r["loop"]["mixer_share"] for r in members])
            row["loop_seconds"] = _interval([r["loop"]["seconds"] for r in members])
        table[config] = row
    return table


PAIRED = ("rb", "ab", "ab_scene", "maxskew@100", "ndkl", "accuracy", "cue_accuracy")


def paired_differences(runs: dict) -> dict:
    """Per configuration, the same-seed difference to its baseline (``none``; for the R&B arms,
    ``rnb_uniform``): mean, t-interval and how many seeds moved down, for the headline figures."""
    by = {(r["config"], r["seed"]): _figures(r) for r in runs.values()}
    out: dict = {}
    for config in sorted({c for c, _ in by}):
        base = "rnb_uniform" if config.startswith("rnb_") else "none"
        if config == base:
            continue
        seeds = sorted(seed for c, seed in by if c == config and (base, seed) in by)
        if not seeds:
            continue
        out[config] = {"baseline": base, "seeds": seeds}
        for k in PAIRED:
            diffs = [by[(config, seed)][k] - by[(base, seed)][k] for seed in seeds]
            out[config][k] = {**_interval(diffs), "seeds_lower": int(sum(d < 0 for d in diffs))}
    return out


def paired_table(result: dict) -> str:
    """Same-seed differences to the baseline: mean (seeds in which the figure went down / seeds)."""
    rows = result.get("paired", {})
    head = ["config", "vs", *[MODEL_FIGURES[k] for k in PAIRED]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, row in rows.items():
        cells = [f"{row[k]['mean']:+.3f} ({row[k]['seeds_lower']}/{len(row['seeds'])})" for k in PAIRED]
        lines.append("| " + " | ".join([config.removeprefix("rnb_"), row["baseline"].removeprefix("rnb_"), *cells]) + " |")
    return "\n".join(lines)


BEGIN, END = "<!-- model-bias-table -->", "<!-- /model-bias-table -->"


def check_markers(*paths: Path) -> None:
    """Raise ValueError naming the file that lacks the table markers (checked before a long run)."""
    for path in paths:
        text = path.read_text()
        if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
            raise ValueError(f"{path}: needs one {BEGIN} line followed by one {END} line, where the table goes")


def _replace_between(path: Path, body: str) -> None:
    check_markers(path)
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + body + "\n" + text[end:])


def update_docs(result: dict, doc: Path, readme: Path) -> None:
    """The full tables (and the same-seed differences) into the doc, the short one into the README."""
    settings = result["settings"]
    cpu = result["cpu_seconds"]["jobs_total"] + result["cpu_seconds"]["driver"]
    where = (f"{settings['seeds']} seeds ({settings['rnb_seeds']} for the R&B arms), {settings['steps']} steps of "
             f"{settings['batch_size']}, {settings['rows']:,} rows; wall {result['seconds']['total_wall'] / 60:.1f} min with "
             f"{settings['jobs']} jobs at a time, {cpu / 60:.1f} CPU-minutes in all; `{result['command']}`")
    _replace_between(doc, f"Mean ± 95% t-interval half-width across seeds; {where}.\n\n{markdown_table(result)}\n\n"
                          f"Same-seed differences (seeds in which the figure went down):\n\n{paired_table(result)}")
    _replace_between(readme, f"{markdown_table(result, README_COLUMNS)}\n\n({where}; docs/model-bias.md has every column.)")


def _fmt(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "ci95" not in cell:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} ± {cell['mean'] - cell['ci95'][0]:.3f}"


def markdown_table(result: dict, columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """The README/doc tables (model figures: mean ± 95% CI half-width across seeds): (a)-(d) with
    the balanced data's retention and association beside them, then the R&B arms (e)."""
    head = ["config", "retention", "data AB occ", "data AB scene", *[MODEL_FIGURES[k] for k in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    arms = []
    for config, row in result["table"].items():
        if config.startswith("rnb_"):
            arms.append((config, row))
            continue
        data = result["data"][config]
        lines.append("| " + " | ".join([config, f"{data['retention']:.2f}", f"{data['ab_occupation']:.3f}",
                                          f"{data['ab_scene']:.3f}", *[_fmt(row.get(k)) for k in columns]]) + " |")
    if arms:
        head = ["R&B arm", *[MODEL_FIGURES[k] for k in columns], "mixer share of loop time"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for config, row in arms:
            lines.append("| " + " | ".join([config.removeprefix("rnb_"), *[_fmt(row.get(k)) for k in columns],
                                              _fmt(row.get("mixer_share"))]) + " |")
    floors = [(row["ab_null"]["mean"], row["ab_scene_null"]["mean"]) for row in result["table"].values() if "ab_null" in row]
    if floors:
        lines += ["", f"AB of the same predictions with the labels shuffled (no association; this set's floor): "
                      f"occupation {min(f[0] for f in floors):.3f}-{max(f[0] for f in floors):.3f}, "
                      f"scene {min(f[1] for f in floors):.3f}-{max(f[1] for f in floors):.3f}."]
    return "\n".join(lines)


def evaluate_recipe(model_dir: Path, checkpoint: Path, eval_path: Path, bootstrap: int = 1000, device: str = "cpu") -> str:
    """The ``mmbalance evaluate`` recipe for one checkpoint: gender predicted with prompts about the
    image's occupation, occupation and the latent scene as labels (the scene only groups AB; the
    model never saw scene words, so its zero-shot scene figures mean nothing and are not reported)."""
    import yaml

    from mmbalance.synth_images import SCENES, gender_prompts, label_prompts

    doc = {
        "model": {"name": f"local-dir:{model_dir}", "checkpoint": str(checkpoint), "device": device, "batch_size": 512},
        "eval": {"path": str(eval_path), "columns": {"uid": "uid", "image": "image", "caption": "caption"}},
        "attributes": [{"name": "gender", "column": "gender", "values": ["woman", "man"],
                        "prompts": gender_prompts("{occupation}")}],
        "labels": [{"name": "occupation", "column": "occupation", "values": list(label_prompts()), "prompts": label_prompts()},
                   {"name": "scene", "column": "scene", "values": list(SCENES), "prompts": ["a photo of a {scene}."]}],
        "bootstrap": {"samples": bootstrap, "confidence": 0.95},
        "retrieval": {"k": [10, 100], "recall_k": [1, 5]},
        "execution": {"executor": "local"},
        "seed": 0,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def evaluate_figures(doc: dict) -> dict:
    """The benchmark's figures from one ``evaluate.json`` (value, and the within-set bootstrap ``ci``
    under ``<key>_ci``): the same keys as model_bias_metrics.metrics, so the two can be compared."""
    g = doc["attributes"]["gender"]
    occ_ab, ret = g["ab"]["occupation"], g["retrieval"]["occupation"]
    rec = doc.get("retrieval") or {}
    picks = {
        "accuracy": doc["labels"]["occupation"]["accuracy"], "cue_accuracy": g["accuracy"], "rb": g["rb"],
        "woman_share": g["share"]["woman"], "ab": occ_ab, "ab_scene": g["ab"]["scene"],
        "maxskew@10": ret["max_skew"]["10"], "maxskew@100": ret["max_skew"]["100"], "ndkl": ret["ndkl"],
        **{f"{short}_r@{k}": rec[side][f"recall@{k}"] for short, side in (("i2t", "image_to_text"), ("t2i", "text_to_image"))
           for k in (1, 5) if side in rec},
    }
    out: dict = {}
    for key, fig in picks.items():
        out[key] = fig["value"]
        out[f"{key}_ci"] = fig["ci"]
    shares = {j: v["share"]["woman"]["value"] for j, v in occ_ab["by_label"].items()}
    out["woman_share_by_occupation"] = shares
    out["woman_share_by_scene"] = {j: v["share"]["woman"]["value"] for j, v in g["ab"]["scene"]["by_label"].items()}
    from mmbalance.synth_images import OCCUPATIONS

    planted = [p for _, p in OCCUPATIONS.values()]
    model = [shares[o] for o in OCCUPATIONS]
    out["skew_correlation"] = float(np.corrcoef(planted, model)[0, 1]) if np.std(model) > 0 else 0.0
    return out


def check_against_numpy(evaluate: dict, numpy_figures: dict) -> float:
    """Largest |difference| between evaluate's figures and the numpy recomputation (shared keys)."""
    keys = [k for k, v in numpy_figures.items() if isinstance(v, float) and isinstance(evaluate.get(k), (int, float))]
    return max((abs(evaluate[k] - numpy_figures[k]) for k in keys), default=float("nan"))
