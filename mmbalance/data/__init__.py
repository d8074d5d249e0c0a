"""Shipped tag vocabularies (prompts and lexicons per value) and their loaders.

Every file here is plain YAML or text that users can copy, edit and point the recipe at instead.
A vocabulary file:

    name: perceived_gender
    kind: attribute                       # attribute (sensitive s) | label (concept y)
    prompt_templates: ["a photo of {}."]  # optional; "{}" takes each value's ``phrase``
    none_prompts: ["a photo of an empty street."]   # the explicit "none" class of zero-shot
    values:
      woman:
        phrase: a woman                   # fills prompt_templates
        prompts: ["a photo of a woman."]  # optional; used instead of the templates when given
        lexicon: [woman, women, she]      # caption words/phrases (whole words, case-insensitive)
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

NONE_VALUE = "none"  # reserved: the zero-shot "no such thing in the image" class
SHIPPED = ("perceived_gender", "age_group", "occupation")


@dataclass(frozen=True)
class Vocabulary:
    """Values of one attribute or label with their prompts (zero-shot) and lexicon (captions)."""

    name: str
    kind: str
    values: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    lexicon: dict[str, tuple[str, ...]]
    none_prompts: tuple[str, ...]


def _strings(obj, where: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list) or not all(isinstance(s, str) and s.strip() for s in obj):
        raise ValueError(f"{where}: expected a list of non-empty strings")
    return tuple(s.strip() for s in obj)


def parse_vocabulary(data: dict, source: str = "vocabulary") -> Vocabulary:
    """Validate a vocabulary mapping (the YAML layout in this module's docstring)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a vocabulary must be a mapping")
    unknown = set(data) - {"name", "kind", "description", "prompt_templates", "none_prompts", "values"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: 'name' is required")
    kind = data.get("kind", "attribute")
    if kind not in ("attribute", "label"):
        raise ValueError(f"{source}: kind must be 'attribute' or 'label', got {kind!r}")
    templates = _strings(data.get("prompt_templates"), f"{source}: prompt_templates")
    if any("{}" not in t for t in templates):
        raise ValueError(f"{source}: every prompt template needs a '{{}}'")
    values = data.get("values")
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{source}: 'values' must be a non-empty mapping")
    prompts, lexicon = {}, {}
    for value, spec in values.items():
        where = f"{source}: values.{value}"
        if not isinstance(value, str) or not value:
            raise ValueError(f"{source}: value names must be non-empty strings, got {value!r}")
        if value == NONE_VALUE:
            raise ValueError(f"{where}: '{NONE_VALUE}' is reserved for the zero-shot none class")
        spec = spec or {}
        unknown = set(spec) - {"phrase", "prompts", "lexicon"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        own = _strings(spec.get("prompts"), f"{where}.prompts")
        phrase = spec.get("phrase", value.replace("_", " "))
        prompts[value] = own or tuple(t.format(phrase) for t in templates)
        lexicon[value] = _strings(spec.get("lexicon"), f"{where}.lexicon")
        if not prompts[value] and not lexicon[value]:
            raise ValueError(f"{where}: needs prompts (or prompt_templates) or a lexicon")
    return Vocabulary(
        name=name,
        kind=kind,
        values=tuple(values),
        prompts=prompts,
        lexicon=lexicon,
        none_prompts=_strings(data.get("none_prompts"), f"{source}: none_prompts"),
    )


def load_vocabulary(name_or_path: str | Path) -> Vocabulary:
    """A shipped vocabulary by name (``SHIPPED``) or a YAML file of the same layout."""
    if str(name_or_path) in SHIPPED:
        text = resources.files(__name__).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source = f"mmbalance/data/{name_or_path}.yaml"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"{path}: no such vocabulary file (shipped ones: {', '.join(SHIPPED)})")
        text, source = path.read_text(encoding="utf-8"), str(path)
    return parse_vocabulary(yaml.safe_load(text), source)


def load_lines(name_or_path: str | Path) -> list[str]:
    """A one-entry-per-line list (metadata entries, negation cues): blank lines are skipped.

    A shipped list is named without its ``.txt`` (e.g. ``negation_cues``). Lines are stripped of
    surrounding whitespace but otherwise kept verbatim (no comment syntax: '#' can be an entry).
    """
    shipped = resources.files(__name__).joinpath(f"{name_or_path}.txt")
    if "/" not in str(name_or_path) and shipped.is_file():
        text = shipped.read_text(encoding="utf-8")
    else:
        text = Path(name_or_path).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
