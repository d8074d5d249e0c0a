"""Data contracts: what an input shard must look like, and the tables mmbalance writes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.types as pat

from mmbalance.schemas.recipe import Recipe


class InputError(ValueError):
    """Bad input that stops the run; the message is one line naming the file, column or row."""


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),  # expected repeats E[repeats]
        pa.field("repeats", pa.int32(), nullable=False),  # seeded unbiased stochastic rounding
        pa.field("shard", pa.string(), nullable=False),  # source shard, relative to the input root
        pa.field("row", pa.int64(), nullable=False),  # row index inside the source shard
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string()),  # null when the uid itself was the problem
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

# Per-shard row hashes used by the global duplicate-uid check, sorted by hash.
UID_HASH_SCHEMA = pa.schema([pa.field("uid_hash", pa.uint64()), pa.field("row", pa.int64())])

UTILITY_COLUMN = "__utility"
TAR_KEY = "__key__"  # a WebDataset sample's key (the uid unless the recipe maps another column)
SOURCE_ERROR = "__error__"  # why a row of a source shard could not be read (null when it could): a reject reason
STATUS_MESSAGE = "error_message"  # img2dataset's reason for a status other than success, carried into the reject


def entries_column(name: str) -> str:
    return f"entries.{name}"


def add_reasons(total: dict[str, int], *parts: Mapping[str, int] | None) -> dict[str, int]:
    """Rejected rows by reason (the accounting every unit returns) summed into ``total``, in place."""
    for part in parts:
        for reason, rows in (part or {}).items():
            total[reason] = total.get(reason, 0) + int(rows)
    return total


def source_column(name: str, source: str) -> str:
    """One source's tag before combination (kept when the combination waits for embeddings)."""
    return f"src.{name}.{source}"


def fired_column(name: str) -> str:
    return f"fired.{name}"


def tag_column(name: str) -> str:
    """Column holding attribute/label ``name`` in the tags sidecar (prefixed: names are user-chosen)."""
    return f"tag.{name}"


def tags_schema(recipe: Recipe) -> pa.Schema:
    fields = [pa.field("row", pa.int64(), nullable=False), pa.field("uid", pa.string(), nullable=False)]
    for spec in [*recipe.attributes, *recipe.labels]:
        if spec.is_metadata:  # every entry a row matches, ascending ids
            fields.append(pa.field(entries_column(spec.name), pa.list_(pa.int32())))
            continue
        if spec.deferred:  # the final tag comes later, from embeddings: keep each scan-time source
            fields += [pa.field(source_column(spec.name, s), pa.string()) for s in spec.sources if s != "zero_shot"]
            continue
        fields.append(pa.field(tag_column(spec.name), pa.string()))
        if len(spec.sources) > 1:  # which sources fired, bit j = spec.sources[j]
            fields.append(pa.field(fired_column(spec.name), pa.int32()))
    if recipe.input.columns.utility:
        fields.append(pa.field(UTILITY_COLUMN, pa.float64()))
    return pa.schema(fields)


def _is_stringish(t: pa.DataType) -> bool:
    if pat.is_dictionary(t):
        return _is_stringish(t.value_type)
    return pat.is_string(t) or pat.is_large_string(t) or getattr(pat, "is_string_view", lambda _: False)(t)


def _is_categorical(t: pa.DataType) -> bool:
    return _is_stringish(t) or pat.is_integer(t) or pat.is_boolean(t)


def _is_embedding(t: pa.DataType) -> bool:
    if pat.is_fixed_size_list(t) or pat.is_list(t) or pat.is_large_list(t):
        return pat.is_float16(t.value_type) or pat.is_float32(t.value_type)
    return False


def _is_image(t: pa.DataType) -> bool:
    if pat.is_binary(t) or pat.is_large_binary(t) or _is_stringish(t):
        return True
    if pat.is_struct(t):
        names = {t.field(i).name for i in range(t.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


@dataclass(frozen=True)
class ColumnRule:
    role: str
    column: str
    accepts: str  # human description for errors
    check: object


@dataclass
class ShardLayout:
    """What one shard's schema told us."""

    columns: list[str]  # source columns the pipeline reads
    embedding_dims: dict[str, int | None] = field(default_factory=dict)  # None: variable-size list


def column_rules(recipe: Recipe) -> list[ColumnRule]:
    cols = recipe.input.columns
    rules = [ColumnRule("uid", cols.uid, "string or integer", lambda t: _is_stringish(t) or pat.is_integer(t))]
    optional = [
        ("caption", cols.caption, "string", _is_stringish),
        ("image", cols.image, "binary, string path or {bytes, path} struct", _is_image),
        ("image_embedding", cols.image_embedding, "list or fixed_size_list of float16/float32", _is_embedding),
        ("text_embedding", cols.text_embedding, "list or fixed_size_list of float16/float32", _is_embedding),
        ("utility", cols.utility, "integer or floating point", lambda t: pat.is_integer(t) or pat.is_floating(t)),
        ("status", cols.status, "string", _is_stringish),
    ]
    rules += [ColumnRule(role, c, desc, fn) for role, c, desc, fn in optional if c]
    for spec in (a for a in recipe.attributes if "column" in a.sources):
        rules.append(ColumnRule(f"attribute {spec.name}", spec.source_column, "string, integer or bool", _is_categorical))
    for spec in (lab for lab in recipe.labels if "column" in lab.sources):
        rules.append(ColumnRule(f"label {spec.name}", spec.source_column, "string, integer or bool", _is_categorical))
    return rules


def check_shard_schema(schema: pa.Schema, recipe: Recipe, shard: str) -> ShardLayout:
    """Check that a shard has every column the recipe maps, with a usable type."""
    layout = ShardLayout(columns=[])
    for rule in column_rules(recipe):
        idx = schema.get_field_index(rule.column)
        if idx < 0:
            raise InputError(
                f"{shard}: missing column '{rule.column}' (the recipe maps it as {rule.role}); "
                f"columns present: {', '.join(schema.names[:20])}"
            )
        dtype = schema.field(idx).type
        # an all-null column (e.g. an empty shard written from Python lists) has type null: every row is missing
        if not pat.is_null(dtype) and not rule.check(dtype):
            raise InputError(f"{shard}: column '{rule.column}' ({rule.role}) has type {dtype}, expected {rule.accepts}")
        if rule.column not in layout.columns:
            layout.columns.append(rule.column)
        if rule.role.endswith("embedding") and not pat.is_null(dtype):
            layout.embedding_dims[rule.column] = dtype.list_size if pat.is_fixed_size_list(dtype) else None
    # read along when present: why a row could not be read (tars), img2dataset's reason for a failed status
    extras = [SOURCE_ERROR] + ([STATUS_MESSAGE] if recipe.input.columns.status else [])
    for name in extras:
        idx = schema.get_field_index(name)
        if idx >= 0 and _is_stringish(schema.field(idx).type) and name not in layout.columns:
            layout.columns.append(name)
    return layout
