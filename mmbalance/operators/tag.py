"""Tagging: attributes s and concept labels y as string tags, from columns and captions.

Each attribute/label names one or more sources (``tag_sources``: the one registry of them); with
several, they are combined by the recipe's rule (``combine``) and ``fired.<name>`` records which
sources tagged the row. Per-shard audit counts (prevalence per source, agreement) and a seeded uid
sample per value merge across shards by summing, for the report's tagging audit (``audit``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmbalance.data import load_vocabulary
from mmbalance.operators.audit import audit_counts, merge_audit, merge_uid_samples, sample_uids
from mmbalance.operators.combine import SourceTags, combine_sources
from mmbalance.operators.coverage import coverage_report, merge_coverage
from mmbalance.operators.tag_sources import SOURCES, source_kind, string_column
from mmbalance.schemas.contract import UTILITY_COLUMN, entries_column, fired_column, source_column, tag_column, tags_schema
from mmbalance.schemas.recipe import Recipe, RecipeError

AUDIT_UIDS_PER_VALUE = 5


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
    if any(source_kind(s).inferred for s in spec.sources):  # inferred tags are audited; given columns are facts
        audit = audit_counts({**{n: per_source[n] for n in names}, "combined": tag} if len(names) > 1 else per_source)
    return tag, fired, audit


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
        for spec in self.specs:  # an unregistered source is an error before any tagger is built
            for source in spec.sources:
                source_kind(source)
        # built once per process, source by source (caption lexicons compile here)
        self.taggers = {(spec.name, name): kind.tagger(spec, recipe)
                        for name, kind in SOURCES.items() if kind.at == "scan"
                        for spec in self.specs if name in spec.sources}

    def _source_tags(self, table: pa.Table, spec, coverage: dict[str, Any] | None = None) -> dict[str, pa.Array]:
        """Each scan-time source's tags (``assign`` sources come later, from embeddings)."""
        return {source: self.taggers[(spec.name, source)].tags(table, coverage)
                for source in spec.sources if source_kind(source).at == "scan"}

    def __call__(self, table: pa.Table, rows: np.ndarray) -> tuple[pa.Table, dict[str, Any]]:
        uids = string_column(table, self.recipe.input.columns.uid)
        data: dict[str, pa.Array] = {"row": pa.array(rows, pa.int64()), "uid": uids}
        audit: dict[str, Any] = {}
        coverage: dict[str, Any] = {}  # caption-source coverage per spec, carried in the audit
        for spec in self.specs:
            per_source = self._source_tags(table, spec, coverage)
            if spec.is_metadata:  # every entry a row matches: a list, not one tag
                data[entries_column(spec.name)] = per_source["metadata"]
                continue
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
