"""Prompts -> class embeddings -> zero-shot predictions, with the zero-shot tagger's machinery.

Each value's prompts are an ensemble (``zero_shot.prompt_embeddings``: unit prompt embeddings
averaged and normalised); scores follow the model's training loss (``zero_shot.model_scoring``:
softmax over cosine / temperature for CLIP, sigmoid of cosine * scale + bias for SigLIP) and the
prediction is the best-scoring value (``zero_shot.class_probabilities``). There is no "none" class:
every image is given one of the values. An attribute whose prompts name a label is scored, for each
image, with the prompts filled with that image's label value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmbalance.operators.zero_shot import ClassEmbeddings, class_probabilities, prompt_embeddings

ATTRIBUTE, LABEL = "attribute", "label"


@dataclass(frozen=True)
class PromptGroup:
    """The filled prompts of one class set: an attribute (for one value of the label its prompts
    name, ``condition``) or a label."""

    kind: str
    name: str
    condition: str | None
    prompts: dict[str, tuple[str, ...]]  # value -> filled prompts


def fill(templates: Sequence[str], fields: Mapping[str, str]) -> tuple[str, ...]:
    """Templates with their placeholders filled; prompts repeated within a value count once."""
    return tuple(dict.fromkeys(t.format_map(fields) for t in templates))


def prompt_groups(kind: str, name: str, templates: Mapping[str, Sequence[str]], phrases: Callable[[str], str],
                  own: Sequence[str], condition: tuple[str, Sequence[str], Callable[[str], str]] | None = None,
                  label_names: Sequence[str] = ()) -> list[PromptGroup]:
    """One group, or one per value of the condition label ``(label name, its values, its phrase)``.
    ``own``: the placeholders that take the value's phrase; ``label_names``: also fill ``{label}``
    with the condition's phrase when it is the only label."""
    def fields(value: str, cond_value: str | None) -> dict[str, str]:
        out = {key: phrases(value) for key in own}
        if condition is not None and cond_value is not None:
            phrase = condition[2](cond_value)
            out[condition[0]] = phrase
            if len(label_names) == 1 and "label" not in out:
                out["label"] = phrase
        return out

    if condition is None:
        return [PromptGroup(kind, name, None, {v: fill(t, fields(v, None)) for v, t in templates.items()})]
    return [PromptGroup(kind, name, c, {v: fill(t, fields(v, c)) for v, t in templates.items()}) for c in condition[1]]


def encode_groups(groups: Sequence[PromptGroup], encode_texts: Callable[[list[str]], np.ndarray],
                  scoring: dict) -> tuple[list[ClassEmbeddings], pa.Table]:
    """Class embeddings of every group (each distinct prompt runs through the text tower once) and
    the table of prompts with their embeddings (kind, name, condition, value, prompt, text_emb)."""
    unique = list(dict.fromkeys(p for g in groups for ps in g.prompts.values() for p in ps))
    emb = np.asarray(encode_texts(unique)) if unique else np.zeros((0, 0), np.float16)
    row = {p: i for i, p in enumerate(unique)}

    def lookup(texts: list[str]) -> np.ndarray:
        return emb[[row[t] for t in texts]]

    classes = [dataclasses.replace(prompt_embeddings(g.prompts, lookup), **scoring) for g in groups]
    records = [(g.kind, g.name, g.condition, v, p) for g in groups for v, ps in g.prompts.items() for p in ps]
    dim = emb.shape[1] if emb.ndim == 2 else 0
    flat = np.asarray(emb[[row[r[4]] for r in records]] if records else np.zeros((0, dim)), np.float16)
    table = pa.table({
        "kind": [r[0] for r in records], "name": [r[1] for r in records],
        "condition": pa.array([r[2] for r in records], pa.string()), "value": [r[3] for r in records],
        "prompt": [r[4] for r in records],
        "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim) if dim else pa.array([], pa.null()),
    })
    return classes, table


def predict(embeddings: np.ndarray, classes: ClassEmbeddings, temperature: float, valid: np.ndarray | None = None) -> np.ndarray:
    """The best-scoring class per image (-1 where the embedding is unusable)."""
    if len(embeddings) == 0:
        return np.zeros(0, np.int64)
    probs = class_probabilities(embeddings, classes, temperature, valid)
    ok = ~np.isnan(probs).any(axis=1)
    return np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1).astype(np.int64)


def predict_conditioned(embeddings: np.ndarray, by_condition: Sequence[ClassEmbeddings], condition: np.ndarray,
                        temperature: float) -> np.ndarray:
    """Prediction per image with the classes of its condition value (``condition`` codes index
    ``by_condition``); -1 where the image has no condition value."""
    out = np.full(len(embeddings), -1, np.int64)
    condition = np.asarray(condition, np.int64)
    for c, classes in enumerate(by_condition):
        rows = np.flatnonzero(condition == c)
        if len(rows):
            out[rows] = predict(embeddings[rows], classes, temperature)
    return out


def query_scores(embeddings: np.ndarray, classes: ClassEmbeddings) -> np.ndarray:
    """(classes, images) cosine of each class's text query with each image (float64): the
    retrieval ranking (a SigLIP sigmoid of an affine map of it ranks the same)."""
    emb = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.asarray(classes.matrix, np.float64) @ (emb / np.where(norms > 0, norms, 1.0)).T


def build_plans(recipe, label_values: Mapping[str, list[str]], encode_texts: Callable[[list[str]], np.ndarray],
                scoring: dict):
    """The attribute and label plans of an evaluation recipe (``schemas.evaluate.EvalRecipe``): every
    prompt filled and encoded once. ``label_values``: each label's classes (declared or seen)."""
    from mmbalance.operators.evaluate.figures import AttributePlan, LabelPlan

    label_specs = {lab.name: lab for lab in recipe.labels}
    label_names = list(label_specs)
    groups: list[PromptGroup] = []
    for lab in recipe.labels:
        values = label_values[lab.name]
        groups += prompt_groups(LABEL, lab.name, lab.resolved(values), lab.phrase, sorted(lab.own_names()))
    for attr in recipe.attributes:
        cond = recipe.condition_of(attr)
        condition = None if cond is None else (cond, label_values[cond], label_specs[cond].phrase)
        groups += prompt_groups(ATTRIBUTE, attr.name, attr.resolved(), attr.phrase, sorted(attr.own_names()),
                                condition, label_names)
    classes, table = encode_groups(groups, encode_texts, scoring)
    by_name: dict[tuple[str, str], list[ClassEmbeddings]] = {}
    for g, c in zip(groups, classes):
        by_name.setdefault((g.kind, g.name), []).append(c)
    labels = [LabelPlan(lab.name, lab.source_column, label_values[lab.name], by_name[(LABEL, lab.name)][0])
              for lab in recipe.labels]
    attributes = [AttributePlan(a.name, a.source_column, list(a.values), a.target_shares(), by_name[(ATTRIBUTE, a.name)],
                                recipe.condition_of(a)) for a in recipe.attributes]
    return attributes, labels, table
