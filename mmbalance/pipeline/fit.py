"""The global fit: the uniform sample, and the cluster and subclass models fitted on it.

The scan keeps, per shard, the rows whose seeded uid priority falls under a threshold sized for
~1.5x the requested sample; here those candidates (duplicates removed) are cut to the exact
bottom-k by priority: a uniform sample of valid rows, the same whatever the sharding or worker
count. Models are small (centroids) and saved under OUT/models/; every shard is then assigned in
a streaming per-shard stage, so memory is bounded by the sample, not the corpus.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.operators.arrays import embedding_matrix, fixed_size_list, unit_rows
from mmbalance.operators.assign import embedding_spec, zero_shot_tags
from mmbalance.operators.cluster.index import assign, cluster_tags, level_ids
from mmbalance.operators.cluster.kmeans import KMeansModel, fit_kmeans
from mmbalance.operators.cluster.sampling import SAMPLE_PRIORITY, SAMPLE_STRATUM, SAMPLE_UID, merge_samples
from mmbalance.operators.cluster.sbcl import fit_subclasses, subclass_caps
from mmbalance.operators.cluster.select_k import sweep_k
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.hashing import sample_priority
from mmbalance.operators.models import load_models, save_model
from mmbalance.pipeline.rows import drop_rows
from mmbalance.io.store import RunStore
from mmbalance.schemas.contract import InputError, tag_column
from mmbalance.schemas.recipe import Recipe, SubclassSpec

if TYPE_CHECKING:
    from mmbalance.operators.zero_shot import ClassEmbeddings

def read_eval_sample(uri: str, recipe: Recipe, dims: dict[str, int]) -> pa.Table:
    """Up to ``sample.size`` image embeddings of an evaluation shard directory (first rows in shard
    order: evaluation sets are small), as the ``image_emb`` column; bad rows are skipped."""
    from mmbalance.io.source import read_source
    from mmbalance.pipeline.rows import SAMPLE_IMAGE
    from mmbalance.pipeline.shards import discover_shards

    column = recipe.input.columns.image_embedding
    if not column:
        raise InputError("balance.eval_path needs input.columns.image_embedding")
    fs, shards = discover_shards(uri, recipe.input.extensions, recipe.input.format)
    parts, total = [], 0
    for shard in shards:
        for table in read_source(fs, shard.path, f"eval:{shard.relpath}", [column], recipe.execution.batch_rows,
                                 shard.format, recipe.execution.verify_checksums):
            matrix, valid = embedding_matrix(table.column(column), dims.get(column))
            x, ok = unit_rows(matrix, valid)
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
    return pa.table({SAMPLE_IMAGE: fixed_size_list(matrix.astype(np.float16))})


_SAMPLE_ORDER = [("priority", "ascending"), ("shard_index", "ascending"), ("row", "ascending")]


def _sample_part(store: RunStore, shard, dups: dict[int, dict[str, list]], embedded: bool,
                 keys_only: bool = False) -> pa.Table | None:
    """One shard's fit-sample candidates, duplicates dropped, embeddings attached from the sidecar
    when they were made after the scan (embed-rejected rows drop out), tagged with the shard's
    index; with ``keys_only`` just priority, row and shard index. None: the shard has no file."""
    if not store.exists("sample", f"{shard.shard_id}.parquet"):
        return None
    part = store.read_table("sample", f"{shard.shard_id}.parquet", columns=["priority", "row"] if keys_only else None)
    part = drop_rows(part, dups.get(shard.index, {}).get("rows", []))[0]
    if embedded:
        sidecar = store.read_table("embeddings", f"{shard.shard_id}.parquet",
                                   columns=["row"] if keys_only else ["row", "image_emb", "text_emb"])
        side_rows = sidecar.column("row").to_numpy()  # ascending, a subset of the valid rows
        rows = part.column("row").to_numpy()
        pos = np.clip(np.searchsorted(side_rows, rows), 0, max(len(side_rows) - 1, 0))
        found = (side_rows[pos] == rows) if len(side_rows) else np.zeros(len(rows), bool)
        part = part.filter(pa.array(found))
        if not keys_only:
            for name in ("image_emb", "text_emb"):
                part = part.append_column(name, sidecar.column(name).take(pa.array(pos[found])))
    return part.append_column("shard_index", pa.array(np.full(part.num_rows, shard.index, np.int64)))


def merge_sample(store: RunStore, shards, dups: dict[int, dict[str, list]], size: int, embedded: bool = False) -> pa.Table | None:
    """Bottom-``size`` of all shards' candidates by priority, duplicates excluded; None if empty.

    Two passes, so the driver never holds every candidate (1.5-1.8x the sample, embeddings and all):
    the keys (priority, shard, row) of every candidate pick the sample, then each shard's chosen rows
    are read in full."""
    keys, present = [], []
    for shard in shards:
        part = _sample_part(store, shard, dups, embedded, keys_only=True)
        if part is not None:
            keys.append(part)
            present.append(shard)
    if not keys:
        return None
    candidates = pa.concat_tables(keys)
    chosen = candidates.take(pc.sort_indices(candidates, sort_keys=_SAMPLE_ORDER).slice(0, size))
    shard_of = chosen.column("shard_index").to_numpy()
    chosen_rows = chosen.column("row").to_numpy()
    parts = []
    for shard in present:
        rows = chosen_rows[shard_of == shard.index]
        if len(rows) or (not parts and shard is present[-1]):  # an empty sample keeps its columns
            part = _sample_part(store, shard, dups, embedded)
            parts.append(part.filter(pc.is_in(part.column("row"), value_set=pa.array(rows, pa.int64()))))
    sample = pa.concat_tables(parts)
    del parts
    return _take_by_column(sample, pc.sort_indices(sample, sort_keys=_SAMPLE_ORDER))


def _take_by_column(table: pa.Table, indices: pa.Array) -> pa.Table:
    """``table.take(indices)`` one column at a time, each source column released once taken: the
    peak is the table plus one column, not twice the table."""
    schema, columns = table.schema, []
    for _ in range(table.num_columns):
        columns.append(table.column(0).take(indices))
        table = table.remove_column(0)
    return pa.Table.from_arrays(columns, schema=schema)


def assign_columns(recipe: Recipe) -> dict[str, str | None]:
    """The embedding columns as the assign stage reads them (source shard or embeddings sidecar)."""
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT, embedding_columns

    cols = embedding_columns(recipe)
    return {"image": cols.get(SAMPLE_IMAGE), "text": cols.get(SAMPLE_TEXT)}


def sample_embedding(spec) -> EmbeddingSpec:
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT

    return embedding_spec(spec, {"image": SAMPLE_IMAGE, "text": SAMPLE_TEXT})


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
    from mmbalance.data import load_vocabulary
    from mmbalance.operators.embed.model import load_model
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


def fit_models(recipe: Recipe, store: RunStore, sample: pa.Table, shards, dups, valid_rows: int,
               ctx=None) -> tuple[pa.Table, dict[str, Any]]:
    """Fit every zero-shot, cluster and subclass model on the sample; returns the sample with their tags."""
    from mmbalance.pipeline.rows import SAMPLE_IMAGE, SAMPLE_TEXT

    info: dict[str, Any] = {"sample_rows": sample.num_rows}
    for spec in recipe.deferred_tags():
        classes = encode_prompts(recipe, spec)
        zs = spec.zero_shot
        classes = dataclasses.replace(classes, meta={"vocabulary": zs.vocabulary, "temperature": zs.temperature,
                                                     "threshold": zs.threshold, "sides": zs.sides})
        save_model(store, spec.name, classes)
        tag, _, _ = zero_shot_tags(spec, classes, sample, {"image": SAMPLE_IMAGE, "text": SAMPLE_TEXT}, sample)
        sample = sample.append_column(tag_column(spec.name), tag)
        info[spec.name] = {"kind": "zero_shot", "classes": list(classes.classes), "sides": zs.sides, **classes.scoring_meta()}
    for spec in recipe.clusters:
        x, ok = sample_embedding(spec).extract(sample)
        ks = [spec.k] if isinstance(spec.k, int) else list(spec.k)
        if ok.sum() < max(ks):
            if valid_rows <= recipe.sample_size():  # the sample already holds every usable row
                raise InputError(f"clusters {spec.name}: k={max(ks)} needs at least that many rows, but the corpus has only "
                                 f"{int(ok.sum())} usable rows (valid, first occurrence, with an embedding); lower k")
            raise InputError(f"clusters {spec.name}: k={max(ks)} needs at least that many sampled rows, got {int(ok.sum())}; "
                             "raise sample.size")
        # train on the whole sample: its size is the user's choice (faiss would subsample to 256*k)
        kwargs = {"seed": spec.seed, "niter": spec.niter, "tol": spec.tol, "nredo": spec.nredo, "swaps": spec.swaps,
                  "method": spec.method, "coarse_k": spec.coarse_k,
                  "max_points_per_centroid": int(ok.sum()) // min(ks) + 1}
        parents: list[np.ndarray] = []
        if spec.levels:
            from mmbalance.operators.hierarchy import fit_hierarchical_kmeans

            tree = fit_hierarchical_kmeans(x[ok], [spec.k, *spec.levels], resample_sizes=spec.resample_size,
                                           n_resamples=spec.n_resamples, **kwargs)
            model, parents = tree.leaf_model(), tree.parents
            meta = {**tree.meta, "k": spec.k, "parents": [p.tolist() for p in parents]}
        elif len(ks) > 1:
            sweep = sweep_k(x[ok], ks, score_rows=spec.silhouette_rows, **kwargs)
            model, meta = sweep.best, {**sweep.best.meta, "sweep": sweep.to_dict()}
        else:
            model = fit_kmeans(x[ok], ks[0], **kwargs)
            meta = dict(model.meta)
        ids, dist = assign(x, model.centroids)
        ids[~ok] = -1
        # exact quality on the whole sample (a two-level fit scored only a subset of it)
        meta.update(kind="cluster", name=spec.name, embedding=spec.embedding, sample_mean_cosine=float(1.0 - dist[ok].mean()))
        save_model(store, spec.name, KMeansModel(model.centroids, meta))
        sample = sample.append_column(tag_column(spec.name), cluster_tags(ids))
        for name, level in zip(spec.level_names(), level_ids(ids, parents)):
            sample = sample.append_column(tag_column(name), cluster_tags(level))
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
            model = fit_subclasses(fit_x, fit_labels, m0=spec.m0, class_sizes=sizes, seed=spec.seed, niter=spec.niter)
        except ValueError as err:
            raise InputError(f"subclasses {spec.name}: {err}; raise sample.size") from None
        model.meta = {**model.meta, "kind": "subclass", "name": spec.name, "of": spec.of, "m0": spec.m0,
                      "embedding": spec.embedding, "classes": model.classes, "counts": model.counts.tolist(),
                      "class_sizes": sizes, "class_sizes_exact": exact, **strata}
        save_model(store, spec.name, model)
        ids, _ = model.assign(x, labels)
        sample = sample.append_column(tag_column(spec.name), model.tags(ids))
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
    matrix, valid = embedding_matrix(sample.column(column))
    try:
        basis = fit_pca(matrix, valid, components, side)
    except ValueError as err:
        raise InputError(f"{err}; raise sample.size") from None
    basis.meta = {"sample_seed": seed, **basis.meta}
    meta = save_model(store, f"pca_{side}", basis)
    return {k: v for k, v in meta.items() if k not in ("sd", "kind", "name")}


def load_embedding_bases(store: RunStore) -> dict[str, Any]:
    """The fitted principal components by embedding side (``operators.pca.PcaBasis``)."""
    return {basis.side: basis for basis in load_models(store, kinds=("pca",)).values()}


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
                SAMPLE_UID: pc.cast(tags.column("uid"), pa.string()),
                SAMPLE_PRIORITY: pa.array(sample_priority(tags.column("uid"), seed), pa.uint64()),
                SAMPLE_STRATUM: pc.cast(tags.column(of), pa.string()),
                "shard_index": pa.array(np.full(tags.num_rows, shard.index, np.int64)),
                "row": tags.column("row"),
            })

    chosen = merge_samples(keys(), per_stratum=caps)
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
                                     **{name: fixed_size_list(embedding_matrix(cand.column(name))[0].astype(np.float16))
                                        for name in sources}}))
        missing = np.setdiff1d(rows, have)
        if len(missing):
            read_shards += 1
            for batch_rows, table in embedding_batches(ctx, store, shard, missing):
                want = np.isin(batch_rows, missing)
                if not want.any():
                    continue
                cols = {"row": pa.array(batch_rows[want], pa.int64())}
                for name, column in sources.items():
                    matrix, _ = embedding_matrix(table.column(column).filter(pa.array(want)), dims.get(column))
                    cols[name] = fixed_size_list(matrix.astype(np.float16))
                got.append(pa.table(cols))
        found = pa.concat_tables(got).combine_chunks() if got else None
        if found is None or found.num_rows != len(rows):
            raise RuntimeError(f"subclasses {spec.name}: shard {shard.relpath}: {len(rows)} rows chosen, "
                               f"{0 if found is None else found.num_rows} embeddings found")
        order = pc.sort_indices(found, sort_keys=[("row", "ascending")])
        found = found.take(order)
        strata = mine.take(pc.sort_indices(mine, sort_keys=[("row", "ascending")]))
        parts.append(pa.table({"shard_index": strata.column("shard_index"), "row": found.column("row"),
                               "stratum": strata.column(SAMPLE_STRATUM),
                               **{name: found.column(name) for name in sources}}))
    table = pa.concat_tables(parts) if parts else None
    if table is None:
        raise InputError(f"subclasses {spec.name}: no rows carry '{spec.of}'")
    record = {"fit_caps": caps, "points_per_subclass": per_subclass, "fit_rows": table.num_rows,
              "shards_read_for_embeddings": read_shards}
    return table, record


def models_digest(store: RunStore) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in store.list_files("models"):
        h.update(name.encode())
        h.update(store.read_bytes("models", name))
    return h.hexdigest()[:16]
