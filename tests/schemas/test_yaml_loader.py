"""The strict YAML reader shared by recipes and tag vocabularies (mmbalance/schemas/yaml_loader.py)."""

from __future__ import annotations

import pytest

from mmbalance.schemas.recipe import RecipeError
from mmbalance.schemas.yaml_loader import load_strict


def test_duplicate_keys_at_any_depth_name_both_lines():
    with pytest.raises(ValueError) as err:
        load_strict("a: 1\nb:\n  c: 1\n  d: 2\n  c: 3\n", "f.yaml")
    assert str(err.value) == "f.yaml: line 5 duplicate key 'c' (first given on line 3)"
    with pytest.raises(RecipeError, match=r"^r\.yaml: line 2 duplicate key 'a' \(first given on line 1\)$"):
        load_strict("a: 1\na: 2\n", "r.yaml", RecipeError)


def test_booleans_stay_strings_and_other_scalars_keep_their_types():
    data = load_strict("yes: no\nOn: [off, TRUE, False]\nn: 3\nf: 0.5\nz: null\nq: 'yes'\n", "f.yaml")
    assert data == {"yes": "no", "On": ["off", "TRUE", "False"], "n": 3, "f": 0.5, "z": None, "q": "yes"}


def test_merge_keys_may_override_and_bad_yaml_is_one_line():
    data = load_strict("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n", "f.yaml")
    assert data["use"] == {"x": 1, "y": 3}
    with pytest.raises(ValueError, match=r"^f\.yaml: line 2 invalid YAML") as err:
        load_strict("a: [1, 2\n", "f.yaml")
    assert "\n" not in str(err.value)
