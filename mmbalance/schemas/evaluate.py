"""The evaluation recipe of ``mmbalance evaluate``: which model, which labelled evaluation set, which
prompts, and how the bias and quality figures are computed (docs/algorithms.md section 9).

Read as strictly as the main recipe (``load_eval_recipe``): unknown keys are errors with a
did-you-mean, a key given twice is an error naming its line, yes/no stay strings.

Prompts: a list of prompts per value, or a list of templates for every value. A template's
placeholders are ``{value}`` or ``{<own name>}`` (the value's phrase; for a label also ``{label}``),
and, in an attribute's prompts, ``{<label name>}`` (``{label}`` when the recipe has one label): the
image's label value, so the attribute is predicted with prompts about that label value ("a woman
who works as a {occupation}"). A value's phrase is ``phrases[value]``, else the value with ``_`` as
spaces. The prompts of one value are an ensemble: their unit embeddings are averaged.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mmbalance.schemas.balance import StrictModel, _check_shares
from mmbalance.schemas.embed import EmbedSpec
from mmbalance.schemas.recipe import (
    AttributeSpec,
    ColumnMap,
    InputSpec,
    LabelSpec,
    Recipe,
    RecipeError,
    _format_error,
    read_recipe_text,
    recipe_mapping,
)



class EvalModelSpec(StrictModel):
    """The model to evaluate; loaded by the embed stage's loader (any model ``embed`` can load)."""

    name: str  # open_clip architecture (ViT-B-32), 'hf-hub:org/repo' or 'local-dir:/path'
    # a checkpoint file or URI: open_clip_train's epoch_N.pt as written (state_dict, 'module.' keys)
    checkpoint: str | None = None
    pretrained: str | None = None  # instead of a checkpoint: an open_clip tag, 'hf-hub:...' or 'random'
    seed: int = 0  # pretrained: random only
    # auto: sigmoid with the model's learned scale and bias for SigLIP (a logit_bias), else softmax
    scoring: Literal["auto", "softmax", "sigmoid"] = "auto"
    temperature: float = Field(default=0.01, gt=0)  # softmax only
    # how the forward pass runs (the embed stage's settings; they never change the figures beyond
    # float rounding of the precision)
    precision: Literal["auto", "fp32", "amp", "fp16", "bf16"] = "auto"
    batch_size: int = Field(default=256, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, gt=0)
    actors: int = Field(default=1, gt=0)
    decode_threads: int | None = Field(default=None, gt=0)
    image_decode: Literal["auto", "pil", "torch"] = "auto"
    max_image_pixels: int = Field(default=89_478_485, gt=0)

    @model_validator(mode="after")
    def _weights(self) -> "EvalModelSpec":
        if self.checkpoint is not None and self.pretrained is not None:
            raise ValueError("give model.checkpoint or model.pretrained, not both")
        return self

    def embed_spec(self, checkpoint: str | None = None) -> EmbedSpec:
        """The embed stage's spec for this model (``checkpoint`` replaces the recipe's)."""
        weights = checkpoint if checkpoint is not None else (self.checkpoint or self.pretrained)
        data = self.model_dump(exclude={"name", "checkpoint", "pretrained", "scoring", "temperature"})
        return EmbedSpec.model_validate({**data, "model": self.name, "pretrained": weights,
                                         "on_image_error": "reject", "on_missing_caption": "image_only"})


class EvalColumns(StrictModel):
    uid: str = "uid"
    image: str = "image"  # bytes, a path (relative to the Parquet file) or a {bytes, path} struct
    caption: str | None = None  # optional: image<->text recall where set


class EvalSetSpec(StrictModel):
    path: str | None = None  # Parquet file or directory; the CLI argument overrides it
    columns: EvalColumns = EvalColumns()
    extensions: list[str] = [".parquet"]


def placeholders(prompt: str, where: str) -> set[str]:
    """The ``{names}`` a prompt uses; a malformed one is an error naming ``where``."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(prompt) if f is not None]
    except ValueError as err:
        raise ValueError(f"{where}: bad template {prompt!r} ({err}); write literal braces as {{{{ }}}}") from None
    if any(f == "" or f.isdigit() for f in fields):
        raise ValueError(f"{where}: template {prompt!r} has a positional {{}}: name it, e.g. {{value}}")
    return set(fields)


class _Prompted(StrictModel):
    """Shared by attributes and labels: the column, values and prompts."""

    name: str
    column: str | None = None  # default: the name
    # a shipped vocabulary (perceived_gender, age_group, occupation) or a vocabulary file: its
    # values when ``values`` is left out, and its prompts for values ``prompts`` does not cover
    vocabulary: str | None = None
    prompts: dict[str, list[str]] | list[str] | None = None
    phrases: dict[str, str] = {}

    @property
    def source_column(self) -> str:
        return self.column or self.name

    def own_names(self) -> set[str]:
        return {"value", self.name}

    def vocabulary_prompts(self) -> dict[str, tuple[str, ...]]:
        if self.vocabulary is None:
            return {}
        from mmbalance.data import load_vocabulary

        vocab = load_vocabulary(self.vocabulary)
        # the vocabulary's prompts are plain text: braces in them are not placeholders
        return {v: tuple(p.replace("{", "{{").replace("}", "}}") for p in vocab.prompts[v]) for v in vocab.values}

    def templates_for(self, value: str, vocab: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
        """The prompt templates of one value: its own list, the shared templates, or the vocabulary's."""
        if isinstance(self.prompts, dict) and value in self.prompts:
            return tuple(self.prompts[value])
        if isinstance(self.prompts, list):
            return tuple(self.prompts)
        return vocab.get(value, ())

    def phrase(self, value: str) -> str:
        return self.phrases.get(value, value.replace("_", " "))

    @field_validator("prompts")
    @classmethod
    def _not_empty(cls, prompts):
        if isinstance(prompts, list) and not prompts:
            raise ValueError("an empty list of templates")
        for value, items in (prompts.items() if isinstance(prompts, dict) else []):
            if not items:
                raise ValueError(f"value '{value}' has an empty list of prompts")
        items = prompts if isinstance(prompts, list) else [p for v in (prompts or {}).values() for p in v]
        if any(not isinstance(p, str) or not p.strip() for p in items):
            raise ValueError("prompts must be non-empty strings")
        return prompts

    def _check_vocabulary(self) -> dict[str, tuple[str, ...]]:
        try:
            return self.vocabulary_prompts()
        except (ValueError, OSError) as err:
            raise ValueError(f"vocabulary: {str(err).splitlines()[0]}") from None


class EvalAttributeSpec(_Prompted):
    """A sensitive attribute: its column (null = a neutral image: no cue), values and prompts.
    RB is measured against ``target`` (uniform over the values when left out)."""

    values: list[str] | None = None
    target: dict[str, float] | None = None

    @model_validator(mode="after")
    def _resolve(self) -> "EvalAttributeSpec":
        vocab = self._check_vocabulary()
        values = self.values if self.values is not None else list(vocab)
        if not values:
            raise ValueError("values: list the attribute's values (or name a vocabulary that has them)")
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        if isinstance(self.prompts, dict):
            extra = sorted(set(self.prompts) - set(values))
            if extra:
                raise ValueError(f"prompts names values not in values {values}: {extra}")
        for value in values:
            if not self.templates_for(value, vocab):
                raise ValueError(f"value '{value}' has no prompts: add prompts.{value}, a list of templates, "
                                 "or a vocabulary with prompts for it")
        if self.target is not None:
            unknown = sorted(set(self.target) - set(values))
            if unknown:
                raise ValueError(f"target has values not in values {values}: {unknown}")
            _check_shares({"target": self.target}, self.name)
        object.__setattr__(self, "values", list(values))
        return self

    def target_shares(self) -> dict[str, float]:
        if self.target is None:
            return {v: 1.0 / len(self.values) for v in self.values}
        return {v: float(self.target.get(v, 0.0)) for v in self.values}

    def resolved(self) -> dict[str, tuple[str, ...]]:
        vocab = self.vocabulary_prompts()
        return {v: self.templates_for(v, vocab) for v in self.values}


class EvalLabelSpec(_Prompted):
    """A label (concept) the attribute is associated with: zero-shot accuracy, AB per value, the
    retrieval queries of MaxSkew/NDKL. ``values``: the classes (default: the values in the set)."""

    values: list[str] | None = None

    def own_names(self) -> set[str]:
        return {"value", "label", self.name}

    @model_validator(mode="after")
    def _resolve(self) -> "EvalLabelSpec":
        vocab = self._check_vocabulary()
        if self.prompts is None and self.vocabulary is None:
            raise ValueError("no prompts: give prompts (a list of templates with {label}, or prompts per value) "
                             "or a vocabulary")
        if self.values is not None:
            if len(set(self.values)) != len(self.values) or not self.values:
                raise ValueError("values must be a non-empty list of unique values")
            self.check_prompts(self.values, vocab)
        return self

    def check_prompts(self, values: list[str], vocab: dict[str, tuple[str, ...]] | None = None) -> None:
        vocab = self.vocabulary_prompts() if vocab is None else vocab
        missing = [v for v in values if not self.templates_for(v, vocab)]
        if missing:
            raise ValueError(f"values without prompts: {missing[:5]}{' ...' if len(missing) > 5 else ''}: add them to "
                             "prompts, give a list of templates, or a vocabulary that has them")

    def resolved(self, values: list[str]) -> dict[str, tuple[str, ...]]:
        vocab = self.vocabulary_prompts()
        return {v: self.templates_for(v, vocab) for v in values}


class BootstrapSpec(StrictModel):
    """Percentile intervals from resampling the images with replacement (seeded with ``seed``)."""

    samples: int = Field(default=1000, ge=0)  # 0: no intervals
    confidence: float = Field(default=0.95, gt=0, lt=1)


class RetrievalSpec(StrictModel):
    k: list[int] = [10, 100]  # MaxSkew@k cut-offs; those larger than the balanced pool are skipped
    recall_k: list[int] = [1, 5]  # image<->text recall@k where the set has captions

    @field_validator("k", "recall_k")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError("a non-empty list of distinct integers >= 1")
        return sorted(ks)


class EvalExecutionSpec(StrictModel):
    """Where the forward pass runs; never changes the figures."""

    # auto: in this process below ray_min_images images, else the embed stage's Ray actor pool
    executor: Literal["auto", "local", "ray"] = "auto"
    ray_min_images: int = Field(default=50_000, ge=0)
    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    batch_rows: int = Field(default=4096, gt=0)
    verify_checksums: bool = False


class EvalRecipe(StrictModel):
    model: EvalModelSpec
    eval: EvalSetSpec = EvalSetSpec()
    attributes: list[EvalAttributeSpec] = []
    labels: list[EvalLabelSpec] = []
    bootstrap: BootstrapSpec = BootstrapSpec()
    retrieval: RetrievalSpec = RetrievalSpec()
    seed: int = 0  # the bootstrap resamples and the balanced retrieval pool
    execution: EvalExecutionSpec = EvalExecutionSpec()

    @model_validator(mode="after")
    def _references(self) -> "EvalRecipe":
        if not self.attributes and not self.labels:
            raise ValueError("nothing to evaluate: list attributes and/or labels")
        names = [a.name for a in self.attributes] + [lab.name for lab in self.labels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"attribute and label names must be unique, repeated: {dupes}")
        label_names = {lab.name for lab in self.labels}
        for i, lab in enumerate(self.labels):
            if isinstance(lab.prompts, list):
                self._check_fields(f"labels.{i}.prompts", lab.prompts, lab.own_names(), set())
            elif isinstance(lab.prompts, dict):
                for value, templates in lab.prompts.items():
                    self._check_fields(f"labels.{i}.prompts.{value}", templates, lab.own_names(), set())
        for i, attr in enumerate(self.attributes):
            conditions: set[str] = set()
            for value, templates in attr.resolved().items():
                conditions |= self._check_fields(f"attributes.{i}.prompts.{value}", templates, attr.own_names(), label_names)
            if len(conditions) > 1:
                raise ValueError(f"attributes.{i}.prompts: templates may name one label, these name {sorted(conditions)}")
        return self

    def _check_fields(self, where: str, templates, own: set[str], labels: set[str]) -> set[str]:
        """Placeholders must be the value's own or a label's; returns the labels named."""
        aliases = {"label": next(iter(labels))} if len(labels) == 1 else {}
        named = set()
        for template in templates:
            for name in placeholders(template, where):
                if name in own:
                    continue
                if name in labels or name in aliases:
                    named.add(aliases.get(name, name))
                    continue
                allowed = sorted(own | labels | set(aliases))
                raise ValueError(f"{where}: template {template!r} names {{{name}}}; known: "
                                 + ", ".join("{" + a + "}" for a in allowed))
        return named

    def condition_of(self, attr: EvalAttributeSpec) -> str | None:
        """The label an attribute's prompts are templated with, if any."""
        labels = {lab.name for lab in self.labels}
        found = set()
        for templates in attr.resolved().values():
            for t in templates:
                for name in placeholders(t, attr.name):
                    if name in labels:
                        found.add(name)
                    elif name == "label" and len(labels) == 1 and name not in attr.own_names():
                        found.add(next(iter(labels)))
        return found.pop() if found else None

    def corpus_recipe(self) -> Recipe:
        """The evaluation set as a corpus: checked with the corpus' column rules and row checks (the
        same one-line errors and reject reasons as ``mmbalance rebalance``)."""
        cols = self.eval.columns
        return Recipe(
            input=InputSpec(columns=ColumnMap(uid=cols.uid, image=cols.image, caption=cols.caption),
                            extensions=self.eval.extensions),
            attributes=[AttributeSpec(name=a.name, source="column", column=a.source_column, values=a.values)
                        for a in self.attributes],
            labels=[LabelSpec(name=lab.name, source="column", column=lab.source_column, values=lab.values)
                    for lab in self.labels],
        )


def _model_at(cls: type, loc: tuple) -> type | None:
    """The pydantic model a location inside ``cls`` points into (list indices skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation]
        cls = None
        while candidates:
            t = candidates.pop(0)
            if isinstance(t, type) and issubclass(t, StrictModel):
                cls = t
                break
            candidates += list(getattr(t, "__args__", ()))
        if cls is None:
            return None
    return cls


def _with_suggestion(message: str, err: ValidationError) -> str:
    """``_format_error`` suggests among missing keys only; an unknown key also gets the closest
    optional key of the section it is in ('model.chekpoint' -> 'checkpoint')."""
    first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    if first["type"] != "extra_forbidden" or "did you mean" in message:
        return message
    import difflib

    parent = _model_at(EvalRecipe, tuple(first["loc"][:-1]))
    close = difflib.get_close_matches(str(first["loc"][-1]), list(parent.model_fields) if parent else [], n=1)
    if not close:
        return message
    head, sep, tail = message.partition("'" + ".".join(str(p) for p in first["loc"]) + "'")
    return f"{head}{sep} (did you mean '{close[0]}'?){tail}" if sep else message


def parse_eval_recipe(data: dict[str, Any] | None, source: str = "evaluation recipe") -> EvalRecipe:
    try:
        return EvalRecipe.model_validate(data or {})
    except ValidationError as err:
        raise RecipeError(_with_suggestion(_format_error(source, err), err)) from None


def load_eval_recipe(path: str | Path) -> EvalRecipe:
    """An evaluation recipe from a local path or a pyarrow filesystem URI, read as the main recipe is."""
    return parse_eval_recipe(recipe_mapping(read_recipe_text(path), str(path)), str(path))
