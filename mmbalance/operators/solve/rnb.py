"""R&B Balance offline (docs/algorithms.md section 2, our formulation): ``balance.method: rnb``.

Domains are the values of a label or cluster (``balance.by``). On the embedding sample
(``CorpusStats.sample``) a linear image-to-text projection ``z = W x`` is trained for a few rounds
with the symmetric CLIP loss against the frozen text embeddings, batches drawn from the current
mixture p. Each round sums every domain's final-layer gradients (``outer(dL/dz, x)`` per sample),
forms the Gram matrix and updates ``p = softmax(lam * G p_eval / ||G p_eval||)`` (the rule in
``mmbalance.mixer``). Rows then get weight ``p_d / (n_d / n)`` over the balanced domains (n_d
counted on the whole corpus), so the expected manifest size stays n. Pure numpy, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.mixer import OnlineMixer
from mmbalance.operators.solve import CorpusStats, LookupSolution, register
from mmbalance.schemas.balance import RnbBalance
from mmbalance.schemas.contract import tag_column


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) float64 rows, unit-normalised, from a (fixed-size) list column without nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    x = flat.reshape(n, -1) if n else np.zeros((0, 0))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@dataclass
class ProxyRun:
    """The trajectory of the proxy run: p before each round and after the last, one G per round."""

    p: np.ndarray
    trajectory: list[np.ndarray] = field(default_factory=list)
    grams: list[np.ndarray] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    sketched: bool = False


def clip_grads(x: np.ndarray, t: np.ndarray, w: np.ndarray, scale: float) -> tuple[float, np.ndarray]:
    """Symmetric CLIP loss of logits ``scale * (x W^T) t^T`` and dL/dz per row (z = x W^T)."""
    b = len(x)
    logits = scale * (x @ w.T) @ t.T
    rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    rows /= rows.sum(axis=1, keepdims=True)
    cols = np.exp(logits - logits.max(axis=0, keepdims=True))
    cols /= cols.sum(axis=0, keepdims=True)
    eye = np.eye(b)
    loss = -0.5 * (np.log(np.diag(rows) + 1e-300).mean() + np.log(np.diag(cols) + 1e-300).mean())
    d_logits = 0.5 * ((rows - eye) + (cols - eye)) / b
    return float(loss), scale * d_logits @ t


def proxy_balance(
    x: np.ndarray, t: np.ndarray, domain: np.ndarray, m: int, step: RnbBalance, p_eval: np.ndarray,
    p_init: np.ndarray,
) -> ProxyRun:
    """Rounds of the proxy run over sample rows (x: image, t: text, domain ids in [0, m))."""
    rng = np.random.default_rng([step.seed, 0x52B])
    di, dt = x.shape[1], t.shape[1]
    w = np.eye(dt, di) if di == dt else rng.normal(0, 1 / np.sqrt(di), size=(dt, di))
    sketched = dt * di > step.gradient_dim
    if sketched:  # JL sketch of outer products: <S1 a (x) S2 b, S1 a' (x) S2 b'> ~ <a, a'><b, b'>
        k = max(1, int(np.sqrt(step.gradient_dim)))
        s1 = rng.normal(0, 1 / np.sqrt(k), size=(k, dt))
        s2 = rng.normal(0, 1 / np.sqrt(k), size=(k, di))
    members = [np.flatnonzero(domain == d) for d in range(m)]
    mixer = OnlineMixer(range(m), lam=step.lam, p_eval=p_eval, p_init=p_init)
    losses: list[float] = []
    shape = (m, s1.shape[0], s2.shape[0]) if sketched else (m, dt, di)
    for _ in range(step.rounds):
        round_losses = []
        for _ in range(step.steps_per_round):
            picks = np.bincount(rng.choice(m, size=step.batch_size, p=mixer.p), minlength=m)
            idx = np.concatenate([members[d][rng.integers(0, len(members[d]), c)] for d, c in enumerate(picks) if c])
            dom = np.repeat(np.arange(m), picks)
            xb, tb = x[idx], t[idx]
            loss, dz = clip_grads(xb, tb, w, step.logit_scale)
            round_losses.append(loss)
            a, b = (dz @ s1.T, xb @ s2.T) if sketched else (dz, xb)
            g = np.zeros(shape)
            for d in np.flatnonzero(picks):
                sel = dom == d
                g[d] = a[sel].T @ b[sel]  # sum of the domain's per-sample outer products
            mixer.accumulate(g, picks)
            w -= step.lr * (dz.T @ xb)
        mixer.step()
        losses.append(float(np.mean(round_losses)))
    run = ProxyRun(p=mixer.p.copy(), trajectory=[h.copy() for h in mixer.history], grams=list(mixer.grams),
                   losses=losses, sketched=sketched)
    return run


def eval_shares_by_nearest(x: np.ndarray, domain: np.ndarray, m: int, x_eval: np.ndarray) -> np.ndarray:
    """Shares of evaluation rows over the training domains, each assigned to the nearest domain
    centroid (cosine); evaluation data is never clustered separately."""
    centroids = np.zeros((m, x.shape[1]))
    np.add.at(centroids, domain, x)
    norm = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.divide(centroids, norm, out=np.zeros_like(centroids), where=norm > 0)
    nearest = np.argmax(x_eval @ centroids.T, axis=1)
    counts = np.bincount(nearest, minlength=m).astype(np.float64)
    return counts / counts.sum()


def _embedding_columns(stats: CorpusStats, table: pa.Table) -> tuple[str, str]:
    cols = stats.recipe.input.columns
    pick = []
    for literal, mapped in (("image_emb", cols.image_embedding), ("text_emb", cols.text_embedding)):
        name = literal if literal in table.column_names else mapped
        if not name or name not in table.column_names:
            raise ValueError(f"balance.method rnb: the sample has no {literal} column (columns: {table.column_names})")
        pick.append(name)
    return pick[0], pick[1]


def cap_domain_weights(weight: np.ndarray, rows: np.ndarray, max_weight: float) -> np.ndarray:
    """min(Q, c w_d) with the one c that keeps sum_d n_d w_d: water-filling over the domains (each
    pass caps at least one more domain, so at most m passes). Needs Q >= the mean weight."""
    total = float(rows @ weight)
    capped = np.zeros(len(weight), dtype=bool)
    out = weight.astype(np.float64).copy()
    for _ in range(len(weight) + 1):
        free_mass = float(rows[~capped] @ weight[~capped])
        if free_mass <= 0:
            break
        scale = (total - max_weight * rows[capped].sum()) / free_mass
        out = np.where(capped, max_weight, scale * weight)
        over = ~capped & (out > max_weight)
        if not over.any():
            break
        capped |= over
    return np.minimum(out, max_weight)


def _six(x: Any) -> Any:
    return np.vectorize(lambda v: float(f"{v:.6g}"))(np.asarray(x)).tolist()


@register("rnb")
def solve_rnb(step: RnbBalance, stats: CorpusStats) -> LookupSolution:
    col = tag_column(step.by)
    sample = stats.sample
    if sample is None or sample.num_rows == 0:
        raise ValueError("balance.method rnb needs the embedding sample (image and text embeddings in input.columns)")
    img_col, txt_col = _embedding_columns(stats, sample)
    if col not in sample.column_names:
        raise ValueError(f"balance.method rnb: the sample has no column {col!r} (balance.by = {step.by!r})")
    sample = sample.filter(pc.and_(
        pc.and_(pc.is_valid(sample.column(col)), pc.is_valid(sample.column(img_col))),
        pc.is_valid(sample.column(txt_col))))
    sample = sample.sort_by("uid") if "uid" in sample.column_names else sample  # order-independent

    # corpus counts per value (null = unlabeled)
    counts = (pl.from_arrow(stats.signatures.select([col, "count"])).group_by(col).agg(pl.col("count").sum())
              .sort(col, nulls_last=True))
    corpus = {v: int(c) for v, c in counts.iter_rows()}
    labeled = {v: c for v, c in corpus.items() if v is not None}
    in_sample = pl.from_arrow(sample.select([col])).get_column(col).value_counts(sort=False)
    sample_rows = {v: int(c) for v, c in in_sample.iter_rows()}
    domains = sorted(v for v, c in labeled.items() if c > 0 and sample_rows.get(v, 0) >= step.min_sample_rows)
    if not domains:
        raise ValueError(f"balance.method rnb: no value of {step.by!r} has {step.min_sample_rows}+ rows in the sample")
    m = len(domains)
    index = {v: i for i, v in enumerate(domains)}
    keep = pc.is_in(sample.column(col), value_set=pa.array(domains, pa.string()))
    sample = sample.filter(keep)
    d_idx = np.array([index[v] for v in sample.column(col).to_pylist()], dtype=np.int64)
    x = embedding_matrix(sample.column(img_col))
    t = embedding_matrix(sample.column(txt_col))

    n_d = np.array([labeled[v] for v in domains], dtype=np.float64)
    eval_source = "uniform"
    if step.eval_shares is not None:
        p_eval = np.array([step.eval_shares.get(v, 0.0) for v in domains], dtype=np.float64)
        if p_eval.sum() <= 0:
            raise ValueError("balance.eval_shares gives no weight to any balanced domain")
        p_eval /= p_eval.sum()
        eval_source = "eval_shares"
    elif getattr(stats, "eval_sample", None) is not None:
        p_eval = eval_shares_by_nearest(x, d_idx, m, embedding_matrix(stats.eval_sample.column(img_col)))
        eval_source = "eval_sample (nearest domain)"
    else:
        p_eval = np.full(m, 1.0 / m)
    p_init = n_d / n_d.sum() if step.init == "natural" else np.full(m, 1.0 / m)

    run = proxy_balance(x, t, d_idx, m, step, p_eval, p_init)
    total = n_d.sum()
    w_dom = run.p * total / n_d  # p_d / (n_d / n) over the balanced domains
    clipped: list[str] = []
    if step.max_weight is not None and w_dom.max() > step.max_weight:
        clipped = [domains[d] for d in np.flatnonzero(w_dom > step.max_weight)]
        w_dom = cap_domain_weights(w_dom, n_d, step.max_weight)
    keys: list[str | None] = []
    weight: list[float] = []
    for v, c in corpus.items():
        keys.append(v)
        if v is None:
            weight.append(1.0 if step.unlabeled == "keep" else 0.0)
        else:
            weight.append(float(w_dom[index[v]]) if v in index else 1.0)
    return LookupSolution(
        method="rnb",
        key_columns=[col],
        keys={col: keys},
        weight=weight,
        default=None,
        diagnostics={
            "by": step.by,
            "domains": domains,
            "corpus_rows": [int(c) for c in n_d],
            "sample_rows": [sample_rows[v] for v in domains],
            "not_balanced": sorted(v for v in labeled if v not in index),
            "p_eval": _six(p_eval),
            "p_eval_source": eval_source,
            "p": _six(run.p),
            "p_trajectory": _six(np.array(run.trajectory)),
            "gram": [_six(g) for g in run.grams],
            "proxy_loss": _six(run.losses),
            "domain_weight": dict(zip(domains, _six(w_dom))),
            # the mixture the weights give (p after clipping at max_weight)
            "p_applied": _six(w_dom * n_d / total),
            "max_weight": step.max_weight,
            "clipped_domains": clipped,
            "gradient_sketched": run.sketched,
            "lam": step.lam,
            "rounds": step.rounds,
        },
    )
