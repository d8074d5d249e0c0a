"""Where an attribute's or label's tag comes from: one registration per recipe ``source``.

A source says when its tag can be made: ``scan``, from the row's own columns while the shard is
read (a tagger built once per process from the spec, ``tags`` per batch), or ``assign``, from the
row's embeddings with the models the fit saved (``assign.zero_shot_tags``); and whether its tags
are inferred (audited: prevalence, agreement, sample uids) or given facts. ``tag.RowTagger`` and
the assign step dispatch through ``source_kind``; a source nobody registered is a RecipeError,
never another source's tagger.

Adding a source: its name in ``schemas/tags.py`` (``TagSource``, with its settings section) and
one ``@register_source`` class here (docs/architecture.md, "Extending"); tests/operators/test_tag.py
checks the two lists agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import load_vocabulary
from mmbalance.operators.lexicon import CAPTION_SOURCE, LexiconAttribute, LexiconTagger, source_tag_column
from mmbalance.operators.metaclip import MetadataMatcher
from mmbalance.schemas.recipe import Recipe, RecipeError

When = Literal["scan", "assign"]


@dataclass(frozen=True)
class SourceKind:
    name: str
    at: When
    inferred: bool  # its tags are a model's or a lexicon's guess: the tagging audit covers them
    tagger: type | None  # scan sources: built from (spec, recipe); ``tags(table, coverage)`` per batch


SOURCES: dict[str, SourceKind] = {}


def register_source(name: str, at: When = "scan", inferred: bool = True):
    def deco(cls):
        SOURCES[name] = SourceKind(name, at, inferred, cls if at == "scan" else None)
        return cls

    return deco


def source_kind(name: str) -> SourceKind:
    try:
        return SOURCES[name]
    except KeyError:
        raise RecipeError(f"tag source {name!r} has no tagger (known: {', '.join(sorted(SOURCES))})") from None


def string_column(table: pa.Table, column: str) -> pa.Array:
    arr = table.column(column).combine_chunks()
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


@register_source("column", inferred=False)
class ColumnSource:
    """The value of a given column; an empty string carries no value (null, like a missing tag)."""

    def __init__(self, spec, recipe: Recipe):
        self.column = spec.source_column

    def tags(self, table: pa.Table, coverage: dict[str, Any] | None = None) -> pa.Array:
        values = string_column(table, self.column)
        return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


@register_source("caption")
class CaptionSource:
    """Lexicon matches in the caption (``lexicon.LexiconTagger``), with what the vocabulary missed."""

    def __init__(self, spec, recipe: Recipe):
        self.name, self.caption = spec.name, recipe.input.columns.caption
        try:
            vocab = load_vocabulary(spec.caption.vocabulary)
        except (ValueError, OSError) as err:
            raise RecipeError(f"{spec.name}.caption.vocabulary: {err}") from None
        values = list(spec.values) if spec.values else list(vocab.values)
        missing = [v for v in values if not vocab.lexicon.get(v)]
        if missing:
            raise RecipeError(f"{spec.name}.caption.vocabulary '{spec.caption.vocabulary}' has no words for values {missing}")
        lexicon = LexiconAttribute(spec.name, tuple(values), {v: vocab.lexicon[v] for v in values}, spec.caption.multiple)
        self.tagger = LexiconTagger([lexicon], negation_window=spec.caption.negation_window,
                                    longest_only=spec.caption.longest_only)

    def tags(self, table: pa.Table, coverage: dict[str, Any] | None = None) -> pa.Array:
        tagged, cover = self.tagger.tag_with_coverage(table.column(self.caption), coverage=coverage is not None)
        if coverage is not None:
            coverage[self.name] = cover[self.name]
        return tagged.column(source_tag_column(self.name, CAPTION_SOURCE)).combine_chunks()


# scored from the row's embeddings against prompt ensembles after the fit: assign.zero_shot_tags
register_source("zero_shot", at="assign")(None)


@register_source("metadata", inferred=False)
class MetadataSource:
    """MetaCLIP entries matched in the caption: every entry id a row matches (list<int32>), not one tag."""

    def __init__(self, spec, recipe: Recipe):
        self.caption = recipe.input.columns.caption
        try:
            self.matcher = MetadataMatcher.from_file(spec.metadata.entries, spec.metadata.longest_only)
        except OSError as err:
            raise RecipeError(f"{spec.name}.metadata.entries: cannot read {spec.metadata.entries} "
                              f"({err.strerror or err})") from None

    def tags(self, table: pa.Table, coverage: dict[str, Any] | None = None) -> pa.ListArray:
        return self.matcher.match(table.column(self.caption))
