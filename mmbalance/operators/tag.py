"""Tagging from columns the corpus already has: attributes s and concept labels y as strings.

Zero-shot and caption-lexicon sources plug in beside ``source: column`` (see the tagging issue).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.schemas.contract import UTILITY_COLUMN, tag_column, tags_schema
from mmbalance.schemas.recipe import Recipe


def _string_column(table: pa.Table, column: str) -> pa.Array:
    arr = table.column(column).combine_chunks()
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


def tag_rows(table: pa.Table, recipe: Recipe, rows: np.ndarray) -> pa.Table:
    """The tags table (TAGS schema) of ``table``; ``rows`` are the source row indices of its rows."""
    data: dict[str, pa.Array] = {
        "row": pa.array(rows, pa.int64()),
        "uid": _string_column(table, recipe.input.columns.uid),
    }
    for spec in [*recipe.attributes, *recipe.labels]:
        values = _string_column(table, spec.source_column)
        # an empty string carries no value: treat it as null, like a missing tag
        data[tag_column(spec.name)] = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    if recipe.input.columns.utility:
        data[UTILITY_COLUMN] = pc.cast(table.column(recipe.input.columns.utility).combine_chunks(), pa.float64())
    return pa.table(data, schema=tags_schema(recipe))


class ColumnTagger:
    """Ray Data operator: a batch of source rows in, its tags table out (``row`` counts within the batch)."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tag_rows(batch, self.recipe, np.arange(batch.num_rows))
