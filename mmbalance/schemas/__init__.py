"""Data contracts and the recipe model."""

from mmbalance.schemas.contract import (
    MANIFEST_SCHEMA,
    REJECTS_SCHEMA,
    InputError,
    check_shard_schema,
    tag_column,
    tags_schema,
)
from mmbalance.schemas.recipe import EXAMPLE_RECIPE, Recipe, RecipeError, parse_recipe

__all__ = [
    "EXAMPLE_RECIPE",
    "MANIFEST_SCHEMA",
    "REJECTS_SCHEMA",
    "InputError",
    "Recipe",
    "RecipeError",
    "check_shard_schema",
    "parse_recipe",
    "tag_column",
    "tags_schema",
]
