"""Recipe files: read from a local path or any filesystem URI (s3://bucket/recipe.yaml), then
parsed by the recipe models (``mmbalance.schemas``), which never touch a filesystem themselves."""

from __future__ import annotations

from pathlib import Path

from mmbalance.io.storage import resolve_filesystem
from mmbalance.schemas.evaluate import EvalRecipe, parse_eval_recipe
from mmbalance.schemas.recipe import Recipe, RecipeError, recipe_from_yaml, recipe_mapping


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text from a local path or a URI (reached with the environment's settings,
    e.g. AWS_ENDPOINT_URL, since the recipe's own storage section is not read yet); unreadable:
    RecipeError."""
    path = str(path)
    try:
        if "://" in path:
            fs, inner = resolve_filesystem(path)
            with fs.open_input_stream(inner) as stream:
                text = stream.read().decode()
        else:
            text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({getattr(err, 'strerror', None) or err})") from None
    return text


def load_recipe(path: str | Path) -> Recipe:
    """A rebalance recipe from a local path or a URI."""
    return recipe_from_yaml(read_recipe_text(path), str(path))


def load_eval_recipe(path: str | Path) -> EvalRecipe:
    """An evaluation recipe from a local path or a URI, read as the main recipe is."""
    return parse_eval_recipe(recipe_mapping(read_recipe_text(path), str(path)), str(path))
