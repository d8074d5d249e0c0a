"""The assign step's operator: zero-shot, cluster and subclass tags of rows from the models the fit
saved (``operators.models``), one batch of embeddings at a time. The fit tags its sample with the
same functions, so the sample and every row get their tags one way."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mmbalance.operators.cluster.index import assign, cluster_tags, level_ids
from mmbalance.operators.cluster.vectors import EmbeddingSpec
from mmbalance.operators.audit import sample_uids
from mmbalance.operators.tag import AUDIT_UIDS_PER_VALUE, combine_tags
from mmbalance.operators.tag_sources import source_kind
from mmbalance.operators.zero_shot import class_probabilities, embedding_matrix, hard_tags
from mmbalance.schemas.contract import InputError, fired_column, source_column, tag_column
from mmbalance.schemas.recipe import Recipe


def embedding_spec(spec, columns: dict[str, str | None]) -> EmbeddingSpec:
    """The embedding a cluster or subclass spec reads, from the ``image`` / ``text`` columns a table holds."""
    return EmbeddingSpec(spec.embedding, image_column=columns.get("image"), text_column=columns.get("text"))


def zero_shot_tags(spec, classes, table: pa.Table, columns: dict[str, str], sources: pa.Table):
    """(tag, fired, audit counts) of a zero-shot attribute/label for one table of rows: its image
    and/or text sides scored against the prompt embeddings, combined with its scan-time sources."""
    zs = spec.zero_shot
    per_source: dict[str, pa.Array] = {}
    probs: dict[str, np.ndarray] = {}
    for source in spec.sources:
        if source_kind(source).at == "scan":  # kept by the scan for this combination
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


def assigned_schema(recipe: Recipe) -> pa.Schema:
    fields = [pa.field("row", pa.int64())]
    for spec in recipe.deferred_tags():
        fields.append(pa.field(tag_column(spec.name), pa.string()))
        if len(spec.source_names()) > 1:
            fields.append(pa.field(fired_column(spec.name), pa.int32()))
    names = [n for c in recipe.clusters for n in (c.name, *c.level_names())] + [s.name for s in recipe.subclasses]
    return pa.schema(fields + [pa.field(tag_column(n), pa.string()) for n in names])


def assign_table(recipe: Recipe, models: dict[str, Any], batch: pa.Table, tags: pa.Table,
                 columns: dict[str, str | None]) -> tuple[pa.Table, dict[str, Any]]:
    """Zero-shot, cluster and subclass tags for one batch of valid rows (``batch``: their embeddings
    in ``columns["image"]`` / ``columns["text"]``; ``tags``: the same rows' scan-time tags), and the
    zero-shot audit counts. ``models``: ``operators.models.load_models`` of the run."""
    data: dict[str, pa.Array] = {"row": tags.column("row").combine_chunks()}
    audit: dict[str, Any] = {}
    for spec in recipe.deferred_tags():
        tag, fired, counts = zero_shot_tags(spec, models[spec.name], batch, columns, tags)
        data[tag_column(spec.name)] = tag
        if fired is not None:
            data[fired_column(spec.name)] = fired
        if counts is not None:
            audit[spec.name] = {"counts": counts,
                                "uids": sample_uids(tags.column("uid"), tag, AUDIT_UIDS_PER_VALUE, recipe.sample.seed)}
    for spec in recipe.clusters:
        model = models[spec.name]
        ids, _ = assign(batch, None, embedding=embedding_spec(spec, columns), index=model.search_index)
        data[tag_column(spec.name)] = cluster_tags(ids)
        for name, level in zip(spec.level_names(), level_ids(ids, model.parents)):
            data[tag_column(name)] = cluster_tags(level)
    for spec in recipe.subclasses:
        model = models[spec.name]
        x, ok = embedding_spec(spec, columns).extract(batch)
        of = tag_column(spec.of)
        labels = data[of] if of in data else tags.column(of).combine_chunks()
        ids, _ = model.assign(x, labels)
        ids[~ok] = -1
        data[tag_column(spec.name)] = model.tags(ids)
    return pa.table(data, schema=assigned_schema(recipe)), audit
