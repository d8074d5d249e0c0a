"""The recipe's attributes and labels: what is tagged and where each tag comes from.

``TagSource`` names the sources a recipe may use (each with its settings section); the operators'
registry (``operators/tag_sources.py``) implements exactly these, a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mmbalance.schemas.balance import StrictModel


TagSource = Literal["column", "caption", "zero_shot", "metadata"]


class CaptionSourceSpec(StrictModel):
    """Tags from caption words: whole-word, case-insensitive lexicon matching (mmbalance/data)."""

    vocabulary: str  # a shipped name (perceived_gender, age_group, occupation) or a YAML path
    # several values in one caption ("he and she"): null (unknown) or the most frequent (majority)
    multiple: Literal["unknown", "majority"] = "unknown"
    negation_window: int = Field(default=2, ge=0)  # "no women", "without a man": 0 turns it off
    longest_only: bool = True  # "old man" is a senior, not also a man


class MetadataSourceSpec(StrictModel):
    """MetaCLIP metadata: entries (one per line) matched as whole words in captions; a row gets
    every entry it matches (multi-hot), and ``cap`` over this label is MetaCLIP balancing."""

    entries: str  # a file path (or a shipped list name), one entry per line
    longest_only: bool = False  # False = MetaCLIP: an entry inside a longer one fires too


class ZeroShotSourceSpec(StrictModel):
    """Tags from embeddings: scores of prompt-ensemble embeddings of each value plus "none"."""

    vocabulary: str  # a shipped name or a YAML path (values with prompts, none_prompts)
    sides: list[Literal["image", "text"]] = ["image"]  # image embeddings, caption (text) embeddings
    # auto: as the model was trained: sigmoid with its learned scale and bias for SigLIP (a
    # logit_bias), softmax over cosine / temperature for CLIP
    scoring: Literal["auto", "softmax", "sigmoid"] = "auto"
    temperature: float = Field(default=0.01, gt=0)  # softmax only; CLIP's logit scale 100
    threshold: float = Field(default=0.5, ge=0, le=1)  # below it (or "none" winning): no tag
    # the text tower that encodes the prompts: default the recipe's embed model; with mapped
    # embedding columns name the model that made them (open_clip name and pretrained tag/path)
    model: str | None = None
    pretrained: str | None = None

    @field_validator("sides")
    @classmethod
    def _sides(cls, sides):
        if not sides or len(set(sides)) != len(sides):
            raise ValueError("sides must list image and/or text once each")
        return sides


class TaggedSpec(StrictModel):
    """Shared by attributes and labels: where the tag comes from."""

    name: str
    source: TagSource | list[TagSource] = "column"
    column: str | None = None
    caption: CaptionSourceSpec | None = None
    zero_shot: ZeroShotSourceSpec | None = None
    metadata: MetadataSourceSpec | None = None
    # several sources: any = the value every tagging source agrees on; all = every source tags and
    # agrees; vote = the most frequent value (ties give null); image / text = any over that modality
    # (captions and given columns count as text); mean = mean of the zero-shot scores and one-hot tags
    combine: Literal["any", "all", "vote", "image", "text", "mean"] = "any"

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @model_validator(mode="after")
    def _source_settings(self):
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError("source must name each of column, caption at most once")
        if "caption" in self.sources and self.caption is None:
            raise ValueError("source caption needs a caption: {vocabulary: ...} section")
        if "zero_shot" in self.sources and self.zero_shot is None:
            raise ValueError("source zero_shot needs a zero_shot: {vocabulary: ...} section")
        if "metadata" in self.sources:
            if self.metadata is None:
                raise ValueError("source metadata needs a metadata: {entries: FILE} section")
            if len(self.sources) > 1:
                raise ValueError("source metadata gives many entries per row: it cannot be combined with other sources")
        return self

    @property
    def is_metadata(self) -> bool:
        return "metadata" in self.sources

    @property
    def deferred(self) -> bool:
        """Tagged after the embeddings exist (zero-shot), not during the scan."""
        return "zero_shot" in self.sources

    def source_names(self) -> list[str]:
        """Sources as the combiner sees them: zero-shot counts once per side."""
        out = []
        for source in self.sources:
            out += [f"zero_shot_{side}" for side in self.zero_shot.sides] if source == "zero_shot" else [source]
        return out


class AttributeSpec(TaggedSpec):
    """A sensitive attribute s: a closed set of values; null means "not applicable" (no person).
    With a caption or zero-shot vocabulary ``values`` may be omitted: the vocabulary's values."""

    values: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _values_from_vocabulary(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("values") is not None:
            return data
        sources = data.get("source", "column")
        sources = [sources] if isinstance(sources, str) else list(sources or [])
        found: dict[str, tuple[str, ...]] = {}
        for source in ("caption", "zero_shot"):
            section = data.get(source)
            name = section.get("vocabulary") if isinstance(section, dict) else getattr(section, "vocabulary", None)
            if source in sources and isinstance(name, str):
                from mmbalance.data import load_vocabulary

                try:
                    found[source] = load_vocabulary(name).values
                except (ValueError, OSError) as err:
                    raise ValueError(f"{data.get('name')}.{source}.vocabulary: {err}") from None
        if not found:
            return data  # "values: Field required" names the missing key
        if len(set(found.values())) > 1:
            raise ValueError("values: the caption and zero_shot vocabularies have different values; list the values to use")
        return {**data, "values": list(next(iter(found.values())))}

    @model_validator(mode="after")
    def _not_metadata(self):
        if self.is_metadata:
            raise ValueError("source metadata is for labels (concepts), not attributes")
        return self

    @field_validator("values")
    @classmethod
    def _unique_values(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        return values


class LabelSpec(TaggedSpec):
    """A concept label y: one-hot over ``values`` or, when omitted, over the values seen."""

    values: list[str] | None = None
