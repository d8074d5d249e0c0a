"""Leakage probes (Wang et al., ICCV 2019): how well a sensitive attribute s can be predicted.

- dataset leakage: a classifier predicting s from the label vector y (one-hot of every label);
- embedding leakage: a linear probe predicting s from the image (and text) embeddings.

Both are fit and scored on the seeded fit sample, split by a hash of the uid into train and a
held-out fifth, before balancing (every row weight 1) and after (the solution's weights as sample
weights in both fitting and scoring). Label-level balancing can leave embedding leakage high;
the report shows it rather than hiding it. Accuracy is reported beside the weighted majority-class
rate, since accuracy alone hides how skewed s is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.cluster import embedding_matrix, unit_rows
from mmbalance.schemas.contract import tag_column
from mmbalance.schemas.recipe import Recipe

HELD_OUT_MOD = 5  # one fifth of the sample, by uid hash


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


def _probe(x: np.ndarray, y: np.ndarray, w: np.ndarray, test: np.ndarray, seed: int) -> dict[str, Any] | None:
    from sklearn.linear_model import LogisticRegression

    train = ~test & (w > 0)
    scored = test & (w > 0)
    if x.shape[1] == 0 or train.sum() < 10 or scored.sum() < 10 or len(np.unique(y[train])) < 2:
        return None
    model = LogisticRegression(max_iter=300, random_state=seed)
    model.fit(x[train], y[train], sample_weight=w[train])
    correct = model.predict(x[scored]) == y[scored]
    ws = w[scored]
    shares = np.bincount(y[scored], weights=ws) / ws.sum()
    accuracy = float((correct * ws).sum() / ws.sum())
    return {"accuracy": accuracy, "majority_rate": float(shares.max()), "excess": accuracy - float(shares.max()),
            "train_rows": int(train.sum()), "test_rows": int(scored.sum())}


def leakage_report(
    sample: pa.Table, recipe: Recipe, vocab: dict[str, list[str]], weights_after: np.ndarray, max_rows: int, seed: int = 0
) -> dict[str, Any]:
    """Probes per attribute, before and after; ``weights_after`` are the solution's weights of the sample rows."""
    sample = sample.slice(0, max_rows)  # the sample is sorted by priority: any prefix is uniform
    weights_after = np.asarray(weights_after[: sample.num_rows], np.float64)
    test = (sample.column("priority").to_numpy() >> np.uint64(7)) % HELD_OUT_MOD == 0
    label_names = recipe.label_names()
    features = {"dataset": _one_hot(sample, label_names, vocab)}
    # per associated label set too, so the report can say which family still leaks
    associated = [lab for step in recipe.balance_steps() if step.method == "m4" for _, lab in step.associate]
    if len(label_names) > 1:
        for name in dict.fromkeys(associated):
            features[f"dataset_{name}"] = _one_hot(sample, [name], vocab)
    for side in ("image_emb", "text_emb"):
        if side in sample.column_names:
            matrix, valid = embedding_matrix(sample.column(side))
            unit, ok = unit_rows(matrix, valid)
            features[f"embedding_{side.split('_')[0]}"] = (unit, ok)
    out: dict[str, Any] = {"sample_rows": sample.num_rows, "held_out_share": 1 / HELD_OUT_MOD}
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
                views[view] = _probe(x[use], code[use], w[use], test[use], seed)
            result[name] = views
        out[attr.name] = result
    return out
