"""The tag-source registry is the only list of sources: the recipe's names and the registered
taggers agree, the scan and the assign step dispatch through it, and a source nobody registered is
an error (it used to fall through to the caption tagger)."""

from __future__ import annotations

import typing

import numpy as np
import pyarrow as pa
import pytest

from mmbalance.operators.tag import RowTagger
from mmbalance.operators.tag_sources import SOURCES, register_source, source_kind
from mmbalance.schemas.recipe import Recipe, RecipeError, parse_recipe
from mmbalance.schemas.tags import AttributeSpec, TagSource


def test_the_recipe_names_exactly_the_registered_sources():
    assert set(typing.get_args(TagSource)) == set(SOURCES)
    assert {n for n, k in SOURCES.items() if k.at == "scan"} == {"column", "caption", "metadata"}
    assert [n for n, k in SOURCES.items() if k.at == "assign"] == ["zero_shot"]


def test_an_unregistered_source_is_an_error_not_a_caption_tagger():
    # pydantic refuses the name in a recipe; a spec built around it (a plugin, a stale registry) must fail too
    spec = AttributeSpec.model_construct(name="g", source="ocr", values=["a", "b"], column=None, caption=None,
                                         zero_shot=None, metadata=None, combine="any")
    recipe = Recipe.model_construct(attributes=[spec])
    with pytest.raises(RecipeError, match="tag source 'ocr' has no tagger"):
        RowTagger(recipe)
    with pytest.raises(RecipeError, match="known: caption, column, metadata, zero_shot"):
        source_kind("ocr")


def test_a_registered_source_tags_rows_through_the_registry(monkeypatch):
    """One registration is all a scan-time source needs: RowTagger builds it and calls it."""
    monkeypatch.setitem(SOURCES, "upper", None)  # removed again after the test

    @register_source("upper", inferred=False)
    class Upper:
        def __init__(self, spec, recipe):
            self.column = spec.source_column

        def tags(self, table, coverage=None):
            return pa.array([v.upper() for v in table.column(self.column).to_pylist()], pa.string())

    spec = AttributeSpec.model_construct(name="g", source="upper", column="raw", values=["A", "B"], caption=None,
                                         zero_shot=None, metadata=None, combine="any")
    recipe = Recipe.model_construct(attributes=[spec])
    tags, audit = RowTagger(recipe)(pa.table({"uid": ["u0", "u1"], "raw": ["a", "b"]}), np.arange(2))
    assert tags.column("tag.g").to_pylist() == ["A", "B"] and audit == {}


def test_scan_sources_keep_their_columns_for_an_assign_source():
    recipe = parse_recipe({
        "input": {"columns": {"caption": "cap", "image_embedding": "e"}, "path": "x"},
        "embed": None,
        "attributes": [{"name": "g", "source": ["column", "caption", "zero_shot"], "column": "given",
                        "caption": {"vocabulary": "perceived_gender"},
                        "zero_shot": {"vocabulary": "perceived_gender", "model": "ViT-B-32", "pretrained": "x.pt"},
                        "values": ["woman", "man"]}],
    })
    table = pa.table({"uid": ["a", "b"], "cap": ["a woman", "a man"], "given": ["man", ""]})
    tags, _ = RowTagger(recipe)(table, np.arange(2))
    assert tags.column("src.g.column").to_pylist() == ["man", None]
    assert tags.column("src.g.caption").to_pylist() == ["woman", "man"]
