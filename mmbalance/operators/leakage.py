"""Leakage probes (Wang et al., ICCV 2019): how well a sensitive attribute s can be predicted.

- dataset leakage: a classifier predicting s from the label vector y (one-hot of every label);
- embedding leakage: a linear probe predicting s from the image (and text) embeddings.

Both are fit and scored on the seeded fit sample, split by a hash of the uid into five folds,
before balancing (every row weight 1) and after (the solution's weights as sample weights in both
fitting and scoring). Label-level balancing can leave embedding leakage high; the report shows it
rather than hiding it. Accuracy is reported beside the weighted majority-class rate, since accuracy
alone hides how skewed s is.

Figures a reader can trust: one fold is held out while it holds at least MIN_HELD_OUT_ROWS
effective rows (Kish, under the view's weights); below that every fold is held out once
(cross-fitting: five fits, every row scored out of fold), which is as wide as the sample gets.
Every accuracy, majority rate and excess carries a 95% interval (the linearised variance of a
weighted ratio: what resampling the scored rows with their weights converges to), and a probe scored on fewer than MIN_READABLE_ROWS effective rows says so (``readable: false``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.arrays import embedding_matrix, unit_rows
from mmbalance.schemas.contract import tag_column
from mmbalance.schemas.recipe import Recipe

HELD_OUT_MOD = 5  # folds by uid hash; fold 0 is the held-out fifth
MIN_HELD_OUT_ROWS = 2000  # effective held-out rows below which every fold is scored out of fold
MIN_READABLE_ROWS = 400  # effective scored rows below which a probe is flagged as too few to read
CONFIDENCE = 0.95


def _one_hot(sample: pa.Table, labels: list[str], vocab: dict[str, list[str]]):
    """Sparse one-hot of the labels' values (rows x sum of vocabulary sizes): thousands of cluster
    values stay cheap."""
    import scipy.sparse as sp

    blocks = []
    for name in labels:
        values = vocab.get(name) or []
        if not values:
            continue
        idx = pc.fill_null(pc.index_in(sample.column(tag_column(name)), value_set=pa.array(values, pa.string())), -1).to_numpy()
        rows = np.flatnonzero(idx >= 0)
        blocks.append(sp.csr_matrix((np.ones(len(rows), np.float32), (rows, idx[rows])), shape=(sample.num_rows, len(values))))
    return sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix((sample.num_rows, 0), dtype=np.float32)


def effective_rows(w: np.ndarray) -> float:
    """Kish's effective sample size of weighted rows, (sum w)^2 / sum w^2."""
    total = float(w.sum())
    return total * total / float((w * w).sum()) if total > 0 else 0.0


def _scores(correct: np.ndarray, y: np.ndarray, w: np.ndarray, classes: int) -> tuple[float, float]:
    """Weighted accuracy and weighted majority-class rate of one set of scored rows."""
    total = w.sum()
    return float((correct * w).sum() / total), float(np.bincount(y, weights=w, minlength=classes).max() / total)


def probe_intervals(correct: np.ndarray, y: np.ndarray, w: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, list[float]]:
    """Intervals of accuracy, majority rate and their difference (excess) over weighted scored rows.

    Each figure is a ratio of weighted sums, so its variance is the linearised (delta-method,
    with-replacement) one, sum w_i^2 r_i^2 / (sum w)^2 with r_i the row's residual: the large-sample
    limit of resampling the rows with their weights, in O(n). Accuracy and majority rate use the
    Wilson score interval at the effective n that variance implies (sound near 0 and 1); the excess
    is paired (one residual per row, c_i - [y_i = majority]), so its interval is not the difference
    of two intervals."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    total = w.sum()
    majority_class = int(np.argmax(np.bincount(y, weights=w)))
    is_majority = (y == majority_class).astype(np.float64)

    def linearised_var(values: np.ndarray) -> tuple[float, float]:
        mean = float((w * values).sum() / total)
        return mean, float((w * w * (values - mean) ** 2).sum() / total**2)

    def wilson(values: np.ndarray) -> list[float]:
        p, var = linearised_var(values)
        n = p * (1 - p) / var if var > 0 else effective_rows(w)  # var = 0: every scored row agrees
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return [float(np.clip(round(centre - half, 12), 0.0, 1.0)), float(np.clip(round(centre + half, 12), 0.0, 1.0))]

    excess, var = linearised_var(correct - is_majority)
    half = z * np.sqrt(var)
    return {"accuracy": wilson(correct), "majority_rate": wilson(is_majority), "excess": [float(excess - half), float(excess + half)]}


def _fit_predict(x, y, w, train: np.ndarray, scored: np.ndarray, seed: int) -> np.ndarray | None:
    from sklearn.linear_model import LogisticRegression

    if train.sum() < 10 or scored.sum() == 0 or len(np.unique(y[train])) < 2:
        return None
    model = LogisticRegression(max_iter=300, random_state=seed)
    model.fit(x[train], y[train], sample_weight=w[train])
    return model.predict(x[scored])


def _probe(x: np.ndarray, y: np.ndarray, w: np.ndarray, fold: np.ndarray, seed: int) -> dict[str, Any] | None:
    """Weighted probe accuracy of predicting ``y`` from ``x``, held out (or cross-fitted), with intervals."""
    if x.shape[1] == 0:
        return None
    use = w > 0
    held = use & (fold == 0)
    if effective_rows(w[held]) >= MIN_HELD_OUT_ROWS:
        scoring, folds = "held_out", [0]
    else:
        scoring, folds = "cross_fit", list(range(HELD_OUT_MOD))
    predicted = np.full(len(y), -1)
    for f in folds:
        scored = use & (fold == f)
        pred = _fit_predict(x, y, w, use & (fold != f), scored, seed)
        if pred is None:
            return None
        predicted[scored] = pred
    scored = predicted >= 0
    if scored.sum() < 10:
        return None
    ys, ws = y[scored], w[scored]
    correct = (predicted[scored] == ys).astype(np.float64)
    accuracy, majority = _scores(correct, ys, ws, int(y.max()) + 1)
    n_eff = effective_rows(ws)
    out = {"accuracy": accuracy, "majority_rate": majority, "excess": accuracy - majority,
           "scoring": scoring, "train_rows": int((use & (fold != 0)).sum()) if scoring == "held_out" else int(use.sum()),
           "test_rows": int(scored.sum()), "effective_test_rows": n_eff, "readable": n_eff >= MIN_READABLE_ROWS}
    intervals = probe_intervals(correct, ys, ws)
    out.update({f"{name}_ci": ci for name, ci in intervals.items()})
    out["confidence"] = CONFIDENCE
    return out


def leakage_report(
    sample: pa.Table, recipe: Recipe, vocab: dict[str, list[str]], weights_after: np.ndarray, max_rows: int, seed: int = 0
) -> dict[str, Any]:
    """Probes per attribute, before and after; ``weights_after`` are the solution's weights of the sample rows."""
    sample = sample.slice(0, max_rows)  # the sample is sorted by priority: any prefix is uniform
    weights_after = np.asarray(weights_after[: sample.num_rows], np.float64)
    fold = ((sample.column("priority").to_numpy() >> np.uint64(7)) % HELD_OUT_MOD).astype(np.int64)
    label_names = recipe.label_names()
    features = {"dataset": _one_hot(sample, label_names, vocab)}
    # per associated label set too, so the report can say which family still leaks
    associated = [lab for step in recipe.balance_steps() if step.method == "m4" for _, lab in step.associate
                  if lab in label_names]  # [attribute, embedding.image] is probed from the embedding below
    if len(label_names) > 1:
        for name in dict.fromkeys(associated):
            features[f"dataset_{name}"] = _one_hot(sample, [name], vocab)
    for side in ("image_emb", "text_emb"):
        if side in sample.column_names:
            matrix, valid = embedding_matrix(sample.column(side))
            unit, ok = unit_rows(matrix, valid)
            features[f"embedding_{side.split('_')[0]}"] = (unit, ok)
    out: dict[str, Any] = {"sample_rows": sample.num_rows, "held_out_share": 1 / HELD_OUT_MOD,
                           "min_held_out_rows": MIN_HELD_OUT_ROWS, "min_readable_rows": MIN_READABLE_ROWS}
    for attr in recipe.attributes:
        s = sample.column(tag_column(attr.name))
        code = pc.fill_null(pc.index_in(s, value_set=pa.array(attr.values, pa.string())), -1).to_numpy()
        carrying = code >= 0
        result: dict[str, Any] = {}
        for name, feat in features.items():
            x, ok = feat if isinstance(feat, tuple) else (feat, np.ones(len(code), bool))
            use = carrying & ok
            views = {}
            for view, w in (("before", np.ones(len(code))), ("after", weights_after)):
                views[view] = _probe(x[use], code[use], w[use], fold[use], seed)
            result[name] = views
        out[attr.name] = result
    return out
