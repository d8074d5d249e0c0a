"""Tagging: attributes s and concept labels y as string tags, from columns and captions.

Each attribute/label names one or more sources (``column``, ``caption``); with several, they are
combined by the recipe's rule and ``fired.<name>`` records which sources tagged the row. Per-shard
audit counts (prevalence per source, agreement) and a seeded uid sample per value merge across
shards by summing, for the report's tagging audit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import load_vocabulary
from mmbalance.operators.lexicon import (
    CAPTION_SOURCE, LexiconAttribute, LexiconTagger, MetadataMatcher, coverage_report, merge_coverage, source_tag_column,
)
from mmbalance.operators.zero_shot import SourceTags, audit_counts, combine_sources, merge_audit, merge_uid_samples, sample_uids
from mmbalance.schemas.contract import UTILITY_COLUMN, entries_column, fired_column, source_column, tag_column, tags_schema
from mmbalance.schemas.recipe import AttributeSpec, LabelSpec, Recipe, RecipeError

AUDIT_UIDS_PER_VALUE = 5


def _string_column(table: pa.Table, column: str) -> pa.Array:
    arr = table.column(column).combine_chunks()
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


def _blank_to_null(values: pa.Array) -> pa.Array:
    # an empty string carries no value: treat it as null, like a missing tag
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _caption_tagger(spec: AttributeSpec | LabelSpec) -> LexiconTagger:
    try:
        vocab = load_vocabulary(spec.caption.vocabulary)
    except (ValueError, OSError) as err:
        raise RecipeError(f"{spec.name}.caption.vocabulary: {err}") from None
    values = list(spec.values) if spec.values else list(vocab.values)
    missing = [v for v in values if not vocab.lexicon.get(v)]
    if missing:
        raise RecipeError(f"{spec.name}.caption.vocabulary '{spec.caption.vocabulary}' has no words for values {missing}")
    lexicon = LexiconAttribute(spec.name, tuple(values), {v: vocab.lexicon[v] for v in values}, spec.caption.multiple)
    return LexiconTagger([lexicon], negation_window=spec.caption.negation_window, longest_only=spec.caption.longest_only)


def combine_tags(spec, per_source: dict[str, pa.Array], probs: dict[str, np.ndarray] | None = None,
                 values: list[str] | None = None) -> tuple[pa.Array, pa.Array | None, dict[str, Any] | None]:
    """The final tag of ``spec`` from its sources (in ``spec.source_names()`` order), the fired
    bitmask when there are several, and audit counts when some source is inferred."""
    names = [n for n in spec.source_names() if n in per_source]
    if len(names) == 1:
        tag, fired = per_source[names[0]], None
    else:
        sources = [SourceTags(n, "image" if n == "zero_shot_image" else "text", per_source[n], (probs or {}).get(n))
                   for n in names]
        tag, bits = combine_sources(sources, spec.combine, values)
        fired = pa.array(bits, pa.int32())
    audit = None
    if "caption" in spec.sources or spec.deferred:  # inferred tags are audited; given columns are facts
        audit = audit_counts({**{n: per_source[n] for n in names}, "combined": tag} if len(names) > 1 else per_source)
    return tag, fired, audit


def _metadata_matcher(spec: LabelSpec) -> MetadataMatcher:
    try:
        return MetadataMatcher.from_file(spec.metadata.entries, spec.metadata.longest_only)
    except OSError as err:
        raise RecipeError(f"{spec.name}.metadata.entries: cannot read {spec.metadata.entries} ({err.strerror or err})") from None


def check_vocabularies(recipe: Recipe, captions: bool = True) -> None:
    """Every vocabulary the recipe names loads and covers its values (a RecipeError naming the key):
    what a run checks before any work, for ``recipe --check`` and the run itself (zero-shot
    vocabularies are otherwise read only at the fit). ``captions=False``: a compiled RowTagger
    already checked the caption lexicons and metadata entry lists."""
    if captions:
        RowTagger(recipe)
    for spec in recipe.deferred_tags():
        try:
            vocab = load_vocabulary(spec.zero_shot.vocabulary)
        except (ValueError, OSError) as err:
            raise RecipeError(f"{spec.name}.zero_shot.vocabulary: {err}") from None
        missing = [v for v in (spec.values or []) if v not in vocab.values]
        if missing:
            raise RecipeError(f"{spec.name}.zero_shot.vocabulary '{spec.zero_shot.vocabulary}' has no prompts for values {missing}")


class RowTagger:
    """Plain-function form: ``tagger(table, rows)`` -> (tags table, audit counts). Build once per
    process: caption lexicons compile here, so recipe mistakes surface before any shard is read."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.specs = [*recipe.attributes, *recipe.labels]
        self.caption = {s.name: _caption_tagger(s) for s in self.specs if "caption" in s.sources}
        self.metadata = {s.name: _metadata_matcher(s) for s in self.specs if s.is_metadata}

    def _source_tags(self, table: pa.Table, spec, coverage: dict[str, Any] | None = None) -> dict[str, pa.Array]:
        out = {}
        for source in spec.sources:
            if source == "zero_shot":
                continue  # from embeddings, after the scan (see mmbalance/pipeline/fit.py)
            if source == "column":
                out["column"] = _blank_to_null(_string_column(table, spec.source_column))
            else:
                captions = table.column(self.recipe.input.columns.caption)
                tagged, cover = self.caption[spec.name].tag_with_coverage(captions, coverage=coverage is not None)
                out["caption"] = tagged.column(source_tag_column(spec.name, CAPTION_SOURCE)).combine_chunks()
                if coverage is not None:
                    coverage[spec.name] = cover[spec.name]
        return out

    def __call__(self, table: pa.Table, rows: np.ndarray) -> tuple[pa.Table, dict[str, Any]]:
        uids = _string_column(table, self.recipe.input.columns.uid)
        data: dict[str, pa.Array] = {"row": pa.array(rows, pa.int64()), "uid": uids}
        audit: dict[str, Any] = {}
        coverage: dict[str, Any] = {}  # caption-source coverage per spec, carried in the audit
        for spec in self.specs:
            if spec.is_metadata:
                data[entries_column(spec.name)] = self.metadata[spec.name].match(table.column(self.recipe.input.columns.caption))
                continue
            per_source = self._source_tags(table, spec, coverage)
            if spec.name in coverage:
                audit.setdefault(spec.name, {})["coverage"] = coverage[spec.name]
            if spec.deferred:
                for source, arr in per_source.items():
                    data[source_column(spec.name, source)] = arr
                continue
            tag, fired, counts = combine_tags(spec, per_source, values=getattr(spec, "values", None))
            if fired is not None:
                data[fired_column(spec.name)] = fired
            data[tag_column(spec.name)] = tag
            if counts is not None:
                audit.setdefault(spec.name, {}).update(
                    counts=counts, uids=sample_uids(uids, tag, AUDIT_UIDS_PER_VALUE, self.recipe.sample.seed))
        if self.recipe.input.columns.utility:
            data[UTILITY_COLUMN] = pc.cast(table.column(self.recipe.input.columns.utility).combine_chunks(), pa.float64())
        schema = tags_schema(self.recipe)
        return pa.table({f.name: data[f.name] for f in schema}, schema=schema), audit


def merge_audits(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-batch or per-shard audits (JSON-able: uid samples as [hash, uid] lists). An item
    has ``counts`` and ``uids`` (inferred tags) and/or ``coverage`` (caption sources)."""
    out: dict[str, Any] = {}
    for part in parts:
        for name, item in part.items():
            merged = out.setdefault(name, {})
            if "counts" in item:
                uids = {v: [tuple(x) for x in items] for v, items in item["uids"].items()}
                if "counts" not in merged:
                    merged["counts"], merged["uids"] = item["counts"], uids
                else:
                    merged["counts"] = merge_audit(merged["counts"], item["counts"])
                    merged["uids"] = merge_uid_samples([merged["uids"], uids], AUDIT_UIDS_PER_VALUE)
            if "coverage" in item:
                merged["coverage"] = merge_coverage(merged.get("coverage"), item["coverage"])
    return out


def coverage_section(audit: dict[str, Any], top: int = 50) -> dict[str, Any]:
    """The report's ``coverage``: per caption-sourced attribute/label, the share of captions tagged
    and the ``top`` most frequent untagged nouns (from the merged audits)."""
    return {name: coverage_report(item["coverage"], top) for name, item in audit.items() if "coverage" in item}


def tag_rows(table: pa.Table, recipe: Recipe, rows: np.ndarray) -> pa.Table:
    """The tags table of ``table``; ``rows`` are the source row indices of its rows."""
    return RowTagger(recipe)(table, rows)[0]
