"""The global fit: the uniform sample, and the cluster and subclass models fitted on it.

The scan keeps, per shard, the rows whose seeded uid priority falls under a threshold sized for
~1.5x the requested sample; here those candidates (duplicates removed) are cut to the exact
bottom-k by priority: a uniform sample of valid rows, the same whatever the sharding or worker
count. Models are small (centroids) and saved under OUT/models/; every shard is then assigned in
a streaming per-shard stage, so memory is bounded by the sample, not the corpus.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators import cluster
from mmbalance.pipeline.rows import drop_rows
from mmbalance.pipeline.store import RunStore
from mmbalance.schemas.contract import InputError, tag_column
from mmbalance.schemas.recipe import ClusterSpec, Recipe, SubclassSpec

if TYPE_CHECKING:
    from mmbalance.operators.zero_shot import ClassEmbeddings

SAMPLE_OVERSAMPLING = 1.5


def sample_threshold(recipe: Recipe, total_rows: int) -> int | None:
    """Priority cut-off (uint64) keeping ~1.5x the sample size in expectation; None: no sample needed."""
    if not recipe.needs_sample():
        return None
    share = min(1.0, SAMPLE_OVERSAMPLING * recipe.sample_size() / max(total_rows, 1) + 64 / max(total_rows, 1))
    return 2**64 - 1 if share >= 1.0 else int(share * 2**64)


def read_eval_sample(uri: str, recipe: Recipe, dims: dict[str, int]) -> pa.Table:
    """Up to ``sample.size`` image embeddings of an evaluation shard directory (first rows in shard
    order: evaluation sets are small), as the ``image_emb`` column; bad rows are skipped."""
    from mmbalance.pipeline.shards import discover_shards
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, read_batches

    column = recipe.input.columns.image_embedding
    if not column:
        raise InputError("balance.eval_path needs input.columns.image_embedding")
    fs, shards = discover_shards(uri, recipe.input.extensions)
    parts, total = [], 0
    for shard in shards:
        with fs.open_input_file(shard.path) as handle:
            for table in read_batches(handle, f"eval:{shard.relpath}", [column], recipe.execution.batch_rows,
                                      recipe.execution.verify_checksums):
                matrix, valid = cluster.embedding_matrix(table.column(column), dims.get(column))
                x, ok = cluster.unit_rows(matrix, valid)
                x = x[ok][: recipe.sample.size - total]
                parts.append(x)
                total += len(x)
                if total >= recipe.sample.size:
                    break
        if total >= recipe.sample.size:
            break
    if total == 0:
        raise InputError(f"{uri}: no usable evaluation embeddings in column '{column}'")
    matrix = np.concatenate(parts)
    return pa.table({SAMPLE_IMAGE: cluster.fixed_size_list(matrix.astype(np.float16))})


def merge_sample(store: RunStore, shards, dups: dict[int, dict[str, list]], size: int, embedded: bool = False) -> pa.Table | None:
    """Bottom-``size`` of all shards' candidates by priority, duplicates excluded; None if empty."""
    parts = []
    for shard in shards:
        if not store.exists("sample", f"{shard.shard_id}.parquet"):
            continue
        part = store.read_table("sample", f"{shard.shard_id}.parquet")
        part = drop_rows(part, dups.get(shard.index, {}).get("rows", []))[0]
        if embedded:  # embeddings were made after the scan: attach them (embed-rejected rows drop out)
            sidecar = store.read_table("embeddings", f"{shard.shard_id}.parquet", columns=["row", "image_emb", "text_emb"])
            side_rows = sidecar.column("row").to_numpy()  # ascending, a subset of the valid rows
            rows = part.column("row").to_numpy()
            pos = np.clip(np.searchsorted(side_rows, rows), 0, max(len(side_rows) - 1, 0))
            found = (side_rows[pos] == rows) if len(side_rows) else np.zeros(len(rows), bool)
            part = part.filter(pa.array(found))
            for name in ("image_emb", "text_emb"):
                part = part.append_column(name, sidecar.column(name).take(pa.array(pos[found])))
        parts.append(part.append_column("shard_index", pa.array(np.full(part.num_rows, shard.index, np.int64))))
    if not parts:
        return None
    sample = pa.concat_tables(parts)
    order = pc.sort_indices(sample, sort_keys=[("priority", "ascending"), ("shard_index", "ascending"), ("row", "ascending")])
    return sample.take(order.slice(0, size))


def _embedding(spec: ClusterSpec | SubclassSpec, image: str | None, text: str | None) -> cluster.EmbeddingSpec:
    return cluster.EmbeddingSpec(spec.embedding, image_column=image, text_column=text)


def sample_embedding(spec) -> cluster.EmbeddingSpec:
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT

    return _embedding(spec, SAMPLE_IMAGE, SAMPLE_TEXT)


def source_embedding(spec, recipe: Recipe) -> cluster.EmbeddingSpec:
    """The embedding columns as the assign stage reads them (source shard or embeddings sidecar)."""
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT, embedding_columns

    cols = embedding_columns(recipe)
    return _embedding(spec, cols.get(SAMPLE_IMAGE), cols.get(SAMPLE_TEXT))


def _save_array(store: RunStore, name: str, array: np.ndarray, meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    store.write_bytes("models", f"{name}.npy", data=buf.getvalue())
    store.write_json("models", f"{name}.json", obj=meta)


def _level_ids(leaf: np.ndarray, parents: list[np.ndarray]) -> list[np.ndarray]:
    """Cluster ids at the coarser levels (level 2 first); -1 stays -1."""
    out, prev = [], leaf
    for parent in parents:
        prev = np.where(prev >= 0, np.asarray(parent)[np.maximum(prev, 0)], -1)
        out.append(prev)
    return out


def _cluster_tags(ids: np.ndarray) -> pa.Array:
    return pa.array([str(i) if i >= 0 else None for i in ids.tolist()], pa.string())


def _subclass_tags(model: cluster.SubclassModel, ids: np.ndarray) -> pa.Array:
    owner = np.searchsorted(model.offsets, ids, side="right") - 1
    return pa.array(
        [f"{model.classes[o]}/{i - model.offsets[o]}" if i >= 0 else None for i, o in zip(ids.tolist(), owner.tolist())],
        pa.string(),
    )


def class_counts(store: RunStore, shards, dups: dict[int, dict[str, list]], column: str) -> dict[str, int]:
    """Exact counts of a tag's values over valid, first-occurrence rows, shard by shard."""
    counts: dict[str, int] = {}
    for shard in shards:
        tags = store.read_table("tags", f"{shard.shard_id}.parquet", columns=["row", column])
        tags = drop_rows(tags, dups.get(shard.index, {}).get("rows", []))[0]
        vc = pc.value_counts(tags.column(column).drop_null())
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            counts[value] = counts.get(value, 0) + int(n)
    return counts


def encode_prompts(recipe: Recipe, spec) -> "ClassEmbeddings":
    """Prompt-ensemble embeddings of a zero-shot attribute/label, from the text tower of the model
    that made the embeddings (computed once per run, on this process's CPU)."""
    import dataclasses

    from mmbalance.data import load_vocabulary
    from mmbalance.operators.embed import load_model
    from mmbalance.operators.zero_shot import model_scoring, vocabulary_embeddings
    from mmbalance.schemas.embed import EmbedSpec

    zs = spec.zero_shot
    try:
        vocab = load_vocabulary(zs.vocabulary)
    except (ValueError, OSError) as err:
        raise InputError(f"{spec.name}.zero_shot.vocabulary: {err}") from None
    values = list(spec.values) if spec.values else list(vocab.values)
    missing = [v for v in values if v not in vocab.values]
    if missing:
        raise InputError(f"{spec.name}.zero_shot.vocabulary '{zs.vocabulary}' has no prompts for values {missing}")
    vocab = dataclasses.replace(vocab, values=tuple(values))
    if zs.model is not None:
        text_spec = EmbedSpec(model=zs.model, pretrained=zs.pretrained)
    else:
        text_spec = recipe.embed
    bundle = load_model(text_spec.model_copy(update={"device": "cpu", "num_gpus": 0.0}))
    try:
        try:
            scoring = model_scoring(bundle.model, zs.scoring)  # SigLIP: sigmoid with the learned scale/bias
        except ValueError as err:
            raise InputError(f"{spec.name}.zero_shot.scoring: {err}") from None
        return vocabulary_embeddings(vocab, bundle.encode_texts, scoring)
    finally:
        bundle.close()


def zero_shot_tags(spec, classes, table: pa.Table, columns: dict[str, str], sources: pa.Table):
    """(tag, fired, audit counts) of a zero-shot attribute/label for one table of rows: its image
    and/or text sides scored against the prompt embeddings, combined with its scan-time sources."""
    from mmbalance.operators.tag import combine_tags
    from mmbalance.operators.zero_shot import class_probabilities, embedding_matrix, hard_tags
    from mmbalance.schemas.contract import source_column

    zs = spec.zero_shot
    per_source: dict[str, pa.Array] = {}
    probs: dict[str, np.ndarray] = {}
    for source in spec.sources:
        if source != "zero_shot":
            per_source[source] = sources.column(source_column(spec.name, source)).combine_chunks()
    for side in zs.sides:
        emb, valid = embedding_matrix(table.column(columns[side]))
        if emb.shape[1] and emb.shape[1] != classes.matrix.shape[1]:
            raise InputError(f"{spec.name}.zero_shot: prompt embeddings are {classes.matrix.shape[1]}-d, "
                             f"{side} embeddings {emb.shape[1]}-d: use the model that made the embeddings")
        if emb.shape[1] == 0:
            p = np.full((table.num_rows, len(classes.classes)), np.nan, np.float32)
        else:
            p = class_probabilities(emb, classes, zs.temperature, valid)
        probs[f"zero_shot_{side}"] = p
        per_source[f"zero_shot_{side}"] = hard_tags(p, classes.classes, zs.threshold)
    return combine_tags(spec, per_source, probs, list(classes.values))


def fit_models(recipe: Recipe, store: RunStore, sample: pa.Table, shards, dups, valid_rows: int,
               ctx=None) -> tuple[pa.Table, dict[str, Any]]:
    """Fit every zero-shot, cluster and subclass model on the sample; returns the sample with their tags."""
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT

    info: dict[str, Any] = {"sample_rows": sample.num_rows}
    for spec in recipe.deferred_tags():
        classes = encode_prompts(recipe, spec)
        zs = spec.zero_shot
        _save_array(store, spec.name, classes.matrix, {
            "kind": "zero_shot", "name": spec.name, "values": list(classes.values), "has_none": classes.has_none,
            "vocabulary": zs.vocabulary, "temperature": zs.temperature, "threshold": zs.threshold, "sides": zs.sides,
            **classes.scoring_meta(),
        })
        tag, _, _ = zero_shot_tags(spec, classes, sample, {"image": SAMPLE_IMAGE, "text": SAMPLE_TEXT}, sample)
        sample = sample.append_column(tag_column(spec.name), tag)
        info[spec.name] = {"kind": "zero_shot", "classes": list(classes.classes), "sides": zs.sides, **classes.scoring_meta()}
    for spec in recipe.clusters:
        x, ok = sample_embedding(spec).extract(sample)
        ks = [spec.k] if isinstance(spec.k, int) else list(spec.k)
        if ok.sum() < max(ks):
            raise InputError(f"clusters {spec.name}: k={max(ks)} needs at least that many sampled rows, got {int(ok.sum())}; "
                             "raise sample.size")
        # train on the whole sample: its size is the user's choice (faiss would subsample to 256*k)
        kwargs = {"seed": spec.seed, "niter": spec.niter, "tol": spec.tol, "nredo": spec.nredo, "method": spec.method,
                  "coarse_k": spec.coarse_k, "max_points_per_centroid": int(ok.sum()) // min(ks) + 1}
        parents: list[np.ndarray] = []
        if spec.levels:
            from mmbalance.operators.hierarchy import fit_hierarchical_kmeans

            tree = fit_hierarchical_kmeans(x[ok], [spec.k, *spec.levels], resample_sizes=spec.resample_size,
                                           n_resamples=spec.n_resamples, **kwargs)
            model, parents = tree.leaf_model(), tree.parents
            meta = {**tree.meta, "k": spec.k, "parents": [p.tolist() for p in parents]}
        elif len(ks) > 1:
            sweep = cluster.sweep_k(x[ok], ks, score_rows=spec.silhouette_rows, **kwargs)
            model, meta = sweep.best, {**sweep.best.meta, "sweep": sweep.to_dict()}
        else:
            model = cluster.fit_kmeans(x[ok], ks[0], **kwargs)
            meta = dict(model.meta)
        ids, dist = cluster.assign(x, model.centroids)
        ids[~ok] = -1
        # exact quality on the whole sample (a two-level fit scored only a subset of it)
        meta.update(kind="cluster", name=spec.name, embedding=spec.embedding, sample_mean_cosine=float(1.0 - dist[ok].mean()))
        _save_array(store, spec.name, model.centroids, meta)
        sample = sample.append_column(tag_column(spec.name), _cluster_tags(ids))
        for name, level in zip(spec.level_names(), _level_ids(ids, parents)):
            sample = sample.append_column(tag_column(name), _cluster_tags(level))
        info[spec.name] = {k: v for k, v in meta.items() if k not in ("embedding", "parents")}
    for side, components in recipe.embedding_moments().items():
        info[f"pca_{side}"] = fit_embedding_basis(store, sample, side, components, recipe.sample.seed)
    # labels tagged only in the fit (clusters and their levels, zero-shot): no per-row tag before assignment
    made_here = {n for c in recipe.clusters for n in (c.name, *c.level_names())} | {t.name for t in recipe.deferred_tags()}
    for spec in recipe.subclasses:
        x, ok = sample_embedding(spec).extract(sample)
        of = tag_column(spec.of)
        labels = sample.column(of).combine_chunks()
        strata: dict[str, Any] = {}
        if spec.of in made_here:
            # class sizes are known only after assignment: estimate n_c from the uniform sample, fit on it
            vc = pc.value_counts(labels.drop_null())
            scale = valid_rows / max(sample.num_rows, 1)
            sizes = {v: int(round(n * scale)) for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}
            exact = False
            fit_x, fit_labels = x, pc.if_else(pa.array(ok), labels, pa.scalar(None, pa.string()))
        else:
            if ctx is None:
                raise ValueError("subclasses of a scan-time label need the run context to read their stratified sample")
            sizes, exact = class_counts(store, shards, dups, of), True
            fit_table, strata = stratified_sample(ctx, store, spec, shards, dups, sizes)
            fit_x, fit_ok = sample_embedding(spec).extract(fit_table)
            fit_labels = pc.if_else(pa.array(fit_ok), fit_table.column("stratum").combine_chunks(), pa.scalar(None, pa.string()))
        try:
            model = cluster.fit_subclasses(fit_x, fit_labels, m0=spec.m0, class_sizes=sizes, seed=spec.seed, niter=spec.niter)
        except ValueError as err:
            raise InputError(f"subclasses {spec.name}: {err}; raise sample.size") from None
        meta = {**model.meta, "kind": "subclass", "name": spec.name, "of": spec.of, "m0": spec.m0,
                "embedding": spec.embedding, "classes": model.classes, "counts": model.counts.tolist(),
                "class_sizes": sizes, "class_sizes_exact": exact, **strata}
        _save_array(store, spec.name, model.centroids, meta)
        ids, _ = model.assign(x, labels)
        sample = sample.append_column(tag_column(spec.name), _subclass_tags(model, ids))
        info[spec.name] = {"subclasses": int(model.counts.sum()), "classes": len(model.classes), "m0": spec.m0,
                           "class_sizes_exact": exact, **strata}
    return sample, info


def fit_embedding_basis(store: RunStore, sample: pa.Table, side: str, components: int, seed: int) -> dict[str, Any]:
    """Principal components of the sample's unit-norm ``side`` embeddings for M4's embedding moments
    (docs/algorithms.md section 8), saved as models/pca_<side>.npy (mean, then components) and .json."""
    from mmbalance.operators.pca import fit_pca
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT

    column = SAMPLE_IMAGE if side == "image" else SAMPLE_TEXT
    if column not in sample.column_names:
        raise InputError(f"balance.associate names embedding.{side} but the fit sample has no {side} embeddings")
    matrix, valid = cluster.embedding_matrix(sample.column(column))
    try:
        basis = fit_pca(matrix, valid, components, side)
    except ValueError as err:
        raise InputError(f"{err}; raise sample.size") from None
    meta = {"kind": "pca", "name": f"pca_{side}", "side": side, "components": basis.k, "sd": basis.sd.tolist(),
            "sample_seed": seed, **basis.meta}
    _save_array(store, f"pca_{side}", basis.stacked(), meta)
    return {k: v for k, v in meta.items() if k not in ("sd", "kind", "name")}


def load_embedding_bases(store: RunStore) -> dict[str, Any]:
    """The fitted principal components by embedding side (``operators.pca.PcaBasis``)."""
    from mmbalance.operators.pca import PcaBasis

    bases = {}
    for name in store.list_files("models", suffix=".json"):
        meta = store.read_json("models", name)
        if meta.get("kind") == "pca":
            stacked = np.load(io.BytesIO(store.read_bytes("models", name.replace(".json", ".npy"))))
            bases[meta["side"]] = PcaBasis.from_stacked(meta["side"], stacked, np.asarray(meta["sd"]), meta)
    return bases


def subclass_caps(sizes: dict[str, int], m0: int, points_per_subclass: int, budget: int) -> tuple[dict[str, int], int]:
    """SBCL per-class fit caps min(n_c, K_c * p) with the largest p <= ``points_per_subclass`` whose
    caps sum to at most ``budget`` rows; returns (caps, p). Every class gets at least K_c rows."""
    names = sorted(sizes)
    n = np.array([sizes[c] for c in names], np.int64)
    counts = cluster.sbcl_subclass_counts(n, m0)
    if counts.sum() > budget:
        raise InputError(f"{int(counts.sum())} SBCL subclasses need at least as many fit rows, but sample.size is "
                         f"{budget}: raise sample.size or m0")
    lo, hi = 1, int(points_per_subclass)  # p = 1 fits: sum(min(n_c, K_c)) <= sum(K_c) <= budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(n, counts * mid).sum() <= budget else (lo, mid - 1)
    return {c: int(v) for c, v in zip(names, np.minimum(n, counts * lo))}, lo


def stratified_sample(ctx, store: RunStore, spec: SubclassSpec, shards, dups, sizes: dict[str, int]) -> tuple[pa.Table, dict[str, Any]]:
    """SBCL's fit sample for subclasses of a scan-time label: per class c the min(n_c, K_c * p)
    rows with the smallest seeded uid priority (the uniform sample's priority, so the two nest),
    selected exactly from the tags sidecars (keys only, memory bounded by the caps), then the
    embeddings of the chosen rows: from the scan's sample candidates where they are there, else
    read from their shard (only shards holding a missing row are read).

    Returns (table with shard_index, row, stratum, image_emb/text_emb; and a record of the caps)."""
    from mmbalance.pipeline.rows import embedding_batches, embedding_columns

    if not sizes:
        raise InputError(f"subclasses {spec.name}: no valid row carries '{spec.of}'")
    caps, per_subclass = subclass_caps(sizes, spec.m0, spec.points_per_subclass, ctx.recipe.sample.size)
    of = tag_column(spec.of)
    seed = ctx.recipe.sample.seed

    def keys():
        for shard in shards:
            tags = store.read_table("tags", f"{shard.shard_id}.parquet", columns=["row", "uid", of])
            tags = drop_rows(tags, dups.get(shard.index, {}).get("rows", []))[0]
            tags = tags.filter(pc.is_valid(tags.column(of)))
            yield pa.table({
                cluster.SAMPLE_UID: pc.cast(tags.column("uid"), pa.string()),
                cluster.SAMPLE_PRIORITY: pa.array(cluster.sample_priority(tags.column("uid"), seed), pa.uint64()),
                cluster.SAMPLE_STRATUM: pc.cast(tags.column(of), pa.string()),
                "shard_index": pa.array(np.full(tags.num_rows, shard.index, np.int64)),
                "row": tags.column("row"),
            })

    chosen = cluster.merge_samples(keys(), per_stratum=caps)
    sources = embedding_columns(ctx.recipe)  # sample name -> column in the shard (or the embeddings sidecar)
    dims = dict(ctx.embedding_dims)
    parts, read_shards = [], 0
    by_index = {s.index: s for s in shards}
    shard_of = chosen.column("shard_index").to_numpy()
    for index in np.unique(shard_of):
        shard = by_index[int(index)]
        mine = chosen.filter(pa.array(shard_of == index))
        rows = np.sort(mine.column("row").to_numpy())
        got: list[pa.Table] = []
        have = np.zeros(0, np.int64)
        if store.exists("sample", f"{shard.shard_id}.parquet") and ctx.recipe.embed is None:
            cand = store.read_table("sample", f"{shard.shard_id}.parquet", columns=["row", *sources])
            hit = pc.is_in(cand.column("row"), value_set=pa.array(rows)).to_numpy(zero_copy_only=False)
            if hit.any():
                cand = cand.filter(pa.array(hit))
                have = cand.column("row").to_numpy()
                got.append(pa.table({"row": pa.array(have, pa.int64()),
                                     **{name: cluster.fixed_size_list(cluster.embedding_matrix(cand.column(name))[0].astype(np.float16))
                                        for name in sources}}))
        missing = np.setdiff1d(rows, have)
        if len(missing):
            read_shards += 1
            task = {"shard_id": shard.shard_id, "path": shard.path, "relpath": shard.relpath}
            for batch_rows, table in embedding_batches(ctx, store, task, missing):
                want = np.isin(batch_rows, missing)
                if not want.any():
                    continue
                cols = {"row": pa.array(batch_rows[want], pa.int64())}
                for name, column in sources.items():
                    matrix, _ = cluster.embedding_matrix(table.column(column).filter(pa.array(want)), dims.get(column))
                    cols[name] = cluster.fixed_size_list(matrix.astype(np.float16))
                got.append(pa.table(cols))
        found = pa.concat_tables(got).combine_chunks() if got else None
        if found is None or found.num_rows != len(rows):
            raise RuntimeError(f"subclasses {spec.name}: shard {shard.relpath}: {len(rows)} rows chosen, "
                               f"{0 if found is None else found.num_rows} embeddings found")
        order = pc.sort_indices(found, sort_keys=[("row", "ascending")])
        found = found.take(order)
        strata = mine.take(pc.sort_indices(mine, sort_keys=[("row", "ascending")]))
        parts.append(pa.table({"shard_index": strata.column("shard_index"), "row": found.column("row"),
                               "stratum": strata.column(cluster.SAMPLE_STRATUM),
                               **{name: found.column(name) for name in sources}}))
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        raise InputError(f"subclasses {spec.name}: no rows carry '{spec.of}'")
    record = {"fit_caps": caps, "points_per_subclass": per_subclass, "fit_rows": table.num_rows,
              "shards_read_for_embeddings": read_shards}
    return table, record


def load_models(store: RunStore) -> dict[str, Any]:
    models = {}
    for name in store.list_files("models", suffix=".json"):
        meta = store.read_json("models", name)
        centroids = np.load(io.BytesIO(store.read_bytes("models", name.replace(".json", ".npy"))))
        if meta["kind"] == "cluster":
            # the search index is built once per process (on a GPU when faiss sees one) and reused per batch
            models[meta["name"]] = ("cluster", centroids, [np.asarray(p, np.int64) for p in meta.get("parents", [])],
                                    cluster.cluster_index(centroids))
        elif meta["kind"] == "pca":  # M4's embedding moments read it at the solve, not the assign stage
            continue
        elif meta["kind"] == "zero_shot":
            from mmbalance.operators.zero_shot import ClassEmbeddings

            models[meta["name"]] = ("zero_shot", ClassEmbeddings.from_meta(meta, centroids))
        else:
            models[meta["name"]] = ("subclass", cluster.SubclassModel(meta["classes"], np.asarray(meta["counts"], np.int64), centroids, meta))
    return models


def models_digest(store: RunStore) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in store.list_files("models"):
        h.update(name.encode())
        h.update(store.read_bytes("models", name))
    return h.hexdigest()[:16]


def assigned_schema(recipe: Recipe) -> pa.Schema:
    from mmbalance.schemas.contract import fired_column

    fields = [pa.field("row", pa.int64())]
    for spec in recipe.deferred_tags():
        fields.append(pa.field(tag_column(spec.name), pa.string()))
        if len(spec.source_names()) > 1:
            fields.append(pa.field(fired_column(spec.name), pa.int32()))
    names = [n for c in recipe.clusters for n in (c.name, *c.level_names())] + [s.name for s in recipe.subclasses]
    return pa.schema(fields + [pa.field(tag_column(n), pa.string()) for n in names])


def assign_table(ctx, models: dict[str, Any], batch: pa.Table, tags: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Zero-shot, cluster and subclass tags for one batch of valid rows (``batch``: their
    embeddings), and the zero-shot audit counts."""
    from mmbalance.operators.zero_shot import sample_uids
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT, embedding_columns
    from mmbalance.schemas.contract import fired_column

    recipe = ctx.recipe
    data: dict[str, pa.Array] = {"row": tags.column("row").combine_chunks()}
    audit: dict[str, Any] = {}
    cols = embedding_columns(recipe)
    for spec in recipe.deferred_tags():
        _, classes = models[spec.name]
        tag, fired, counts = zero_shot_tags(spec, classes, batch, {"image": cols.get(SAMPLE_IMAGE), "text": cols.get(SAMPLE_TEXT)}, tags)
        data[tag_column(spec.name)] = tag
        if fired is not None:
            data[fired_column(spec.name)] = fired
        if counts is not None:
            audit[spec.name] = {"counts": counts, "uids": sample_uids(tags.column("uid"), tag, 5, recipe.sample.seed)}
    for spec in recipe.clusters:
        _, centroids, parents, index = models[spec.name]
        ids, _ = cluster.assign(batch, centroids, embedding=source_embedding(spec, recipe), index=index)
        data[tag_column(spec.name)] = _cluster_tags(ids)
        for name, level in zip(spec.level_names(), _level_ids(ids, parents)):
            data[tag_column(name)] = _cluster_tags(level)
    for spec in recipe.subclasses:
        _, model = models[spec.name]
        x, ok = source_embedding(spec, recipe).extract(batch)
        of = tag_column(spec.of)
        labels = data[of] if of in data else tags.column(of).combine_chunks()
        ids, _ = model.assign(x, labels)
        ids[~ok] = -1
        data[tag_column(spec.name)] = _subclass_tags(model, ids)
    return pa.table(data, schema=assigned_schema(recipe)), audit
