"""Shipped tag vocabularies (prompts and lexicons per value) and their loaders.

Every file here is plain YAML or text that users can copy, edit and point the recipe at instead
(sources and licences: ``SOURCES.md``; extending them and metadata lists: ``README.md``). A file:

    name: perceived_gender
    kind: attribute                       # attribute (sensitive s) | label (concept y)
    prompt_templates: ["a photo of {}."]  # optional; "{}" takes each value's ``phrase``
    none_prompts: ["a photo of an empty street."]   # the explicit "none" class of zero-shot
    values:
      woman:
        phrase: a woman                   # fills prompt_templates
        prompts: ["a photo of a woman."]  # optional; used instead of the templates when given
        lexicon: [woman, women, she]      # caption words/phrases (whole words, case-insensitive)

A file can build on a shipped vocabulary (or another file) instead of copying it:

    name: my_occupation
    extends: occupation                   # a shipped name, or a path relative to this file
    drop_values: [model]                  # inherited values to remove
    values:
      welder: {phrase: a welder, lexicon: [welder, welders]}   # a new value
      nurse: {lexicon: [nurse, nurses, rn]}                     # replaces the inherited lexicon
      doctor: {add_lexicon: [gp, gps]}                          # adds to the inherited lexicon

A phrase a file lists under one of its values moves there from the inherited value that had it
(a phrase is never under two values). Kind, templates and none prompts are inherited unless the
file sets them; new templates re-fill every value that has a phrase rather than its own prompts.

Files are read as recipes are (``mmbalance.schemas.yaml_loader``): a key given twice in one mapping
is an error naming the file and line, and yes/no/on/off/true/false stay strings (value names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

NONE_VALUE = "none"  # reserved: the zero-shot "no such thing in the image" class
SHIPPED = ("perceived_gender", "age_group", "occupation")
_TOP_KEYS = {"name", "kind", "description", "prompt_templates", "none_prompts", "values", "extends", "drop_values"}
_VALUE_KEYS = {"phrase", "prompts", "lexicon", "add_lexicon"}


@dataclass(frozen=True)
class Vocabulary:
    """Values of one attribute or label with their prompts (zero-shot) and lexicon (captions)."""

    name: str
    kind: str
    values: tuple[str, ...]
    prompts: dict[str, tuple[str, ...]]
    lexicon: dict[str, tuple[str, ...]]
    none_prompts: tuple[str, ...]
    templates: tuple[str, ...] = ()
    # value -> the phrase its prompts were made from (absent: the value has prompts of its own)
    phrases: dict[str, str] = field(default_factory=dict)


def _strings(obj, where: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list) or not all(isinstance(s, str) and s.strip() for s in obj):
        raise ValueError(f"{where}: expected a list of non-empty strings")
    return tuple(s.strip() for s in obj)


def _phrase_key(phrase: str) -> str:
    # phrases that tokenise alike are one phrase ("Fire-fighter" = "fire fighter")
    return " ".join(phrase.lower().replace("-", " ").replace("_", " ").split())


def _kind(data: dict, default: str, source: str) -> str:
    kind = data.get("kind", default)
    if kind not in ("attribute", "label"):
        raise ValueError(f"{source}: kind must be 'attribute' or 'label', got {kind!r}")
    return kind


def _templates(data: dict, source: str) -> tuple[str, ...]:
    templates = _strings(data.get("prompt_templates"), f"{source}: prompt_templates")
    if any("{}" not in t for t in templates):
        raise ValueError(f"{source}: every prompt template needs a '{{}}'")
    return templates


def _value_specs(data: dict, source: str, *, required: bool) -> dict[str, dict]:
    values = data.get("values")
    if values is None and not required:
        return {}
    if not isinstance(values, dict) or (required and not values):
        raise ValueError(f"{source}: 'values' must be a non-empty mapping")
    out = {}
    for value, spec in values.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{source}: value names must be non-empty strings, got {value!r}")
        where = f"{source}: values.{value}"
        if value == NONE_VALUE:
            raise ValueError(f"{where}: '{NONE_VALUE}' is reserved for the zero-shot none class")
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a mapping with phrase, prompts, lexicon")
        spec = spec or {}
        unknown = set(spec) - _VALUE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if "phrase" in spec and not (isinstance(spec["phrase"], str) and spec["phrase"].strip()):
            raise ValueError(f"{where}.phrase: expected a non-empty string")
        out[value] = spec
    return out


def _fill(value: str, spec: dict, templates: tuple[str, ...], where: str, phrases: dict, prompts: dict) -> None:
    own = _strings(spec.get("prompts"), f"{where}.prompts")
    if own:
        prompts[value] = own
        phrases.pop(value, None)
    else:
        phrases[value] = spec.get("phrase", value.replace("_", " ")).strip()
        prompts[value] = tuple(t.format(phrases[value]) for t in templates)


def _finish(name, kind, order, prompts, lexicon, none_prompts, templates, phrases, source) -> Vocabulary:
    for value in order:
        if not prompts.get(value) and not lexicon.get(value):
            raise ValueError(f"{source}: values.{value}: needs prompts (or prompt_templates) or a lexicon")
    return Vocabulary(name, kind, tuple(order), {v: prompts.get(v, ()) for v in order}, {v: lexicon.get(v, ()) for v in order},
                      none_prompts, templates, {v: phrases[v] for v in order if v in phrases})


def _extend(base: Vocabulary, data: dict, source: str) -> Vocabulary:
    specs = _value_specs(data, source, required=False)
    drop = _strings(data.get("drop_values"), f"{source}: drop_values")
    missing = sorted(set(drop) - set(base.values))
    if missing:
        raise ValueError(f"{source}: drop_values names values not in '{base.name}': {missing}")
    templates = _templates(data, source) if "prompt_templates" in data else base.templates
    order = [v for v in base.values if v not in drop] + [v for v in specs if v not in base.values]
    if not order:
        raise ValueError(f"{source}: no values left after drop_values")
    prompts, lexicon, phrases = dict(base.prompts), dict(base.lexicon), dict(base.phrases)
    if "prompt_templates" in data:  # new templates re-fill every inherited value made from a phrase
        for value, phrase in base.phrases.items():
            prompts[value] = tuple(t.format(phrase) for t in templates)
    claimed: dict[str, str] = {}  # phrase key -> the value of this file that lists it
    for value, spec in specs.items():
        where = f"{source}: values.{value}"
        if value not in base.values and "add_lexicon" in spec:
            raise ValueError(f"{where}: add_lexicon extends an inherited value; {value!r} is new (use lexicon)")
        if value not in base.values or "prompts" in spec or "phrase" in spec:
            _fill(value, spec, templates, where, phrases, prompts)
        own = _strings(spec.get("lexicon"), f"{where}.lexicon")
        added = _strings(spec.get("add_lexicon"), f"{where}.add_lexicon")
        lexicon[value] = (own if "lexicon" in spec else lexicon.get(value, ())) + added
        for phrase in own + added:
            claimed[_phrase_key(phrase)] = value
    for value in order:
        lexicon[value] = tuple(p for p in lexicon.get(value, ()) if claimed.get(_phrase_key(p), value) == value)
    none = _strings(data.get("none_prompts"), f"{source}: none_prompts") if "none_prompts" in data else base.none_prompts
    return _finish(data["name"], _kind(data, base.kind, source), order, prompts, lexicon, none, templates, phrases, source)


def parse_vocabulary(data: dict, source: str = "vocabulary", base_dir: Path | None = None,
                     _seen: tuple[str, ...] = ()) -> Vocabulary:
    """Validate a vocabulary mapping (the YAML layout in this module's docstring); a relative
    ``extends`` path is resolved against ``base_dir`` (default: the working directory)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a vocabulary must be a mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: 'name' is required")
    if "extends" in data:
        parent = data["extends"]
        if not isinstance(parent, str) or not parent:
            raise ValueError(f"{source}: 'extends' must name a shipped vocabulary or a file")
        if parent not in SHIPPED and base_dir is not None and not Path(parent).is_absolute():
            parent = str(base_dir / parent)
        return _extend(_load(parent, _seen), data, source)
    if "drop_values" in data:
        raise ValueError(f"{source}: drop_values needs extends")
    templates = _templates(data, source)
    prompts: dict[str, tuple[str, ...]] = {}
    lexicon: dict[str, tuple[str, ...]] = {}
    phrases: dict[str, str] = {}
    specs = _value_specs(data, source, required=True)
    for value, spec in specs.items():
        where = f"{source}: values.{value}"
        if "add_lexicon" in spec:
            raise ValueError(f"{where}: add_lexicon needs extends (use lexicon)")
        _fill(value, spec, templates, where, phrases, prompts)
        lexicon[value] = _strings(spec.get("lexicon"), f"{where}.lexicon")
    none = _strings(data.get("none_prompts"), f"{source}: none_prompts")
    return _finish(name, _kind(data, "attribute", source), list(specs), prompts, lexicon, none, templates, phrases, source)


def _load(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> Vocabulary:
    shipped = str(name_or_path) in SHIPPED
    key = str(name_or_path) if shipped else str(Path(name_or_path).resolve())
    if key in seen:
        raise ValueError(f"{name_or_path}: 'extends' loops back to itself ({' -> '.join([*seen, key])})")
    if shipped:
        text = resources.files(__name__).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
        source, base_dir = f"mmbalance/data/{name_or_path}.yaml", None
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"{path}: no such vocabulary file (shipped ones: {', '.join(SHIPPED)})")
        text, source, base_dir = path.read_text(encoding="utf-8"), str(path), path.parent
    # the recipe's YAML rules: a key given twice is an error naming its line (not last-one-wins),
    # and yes/no/on/off/true/false stay strings (value names). Imported here: the schemas package's
    # __init__ loads the recipe model (pydantic), which `import mmbalance.data` does not need.
    from mmbalance.schemas.yaml_loader import load_strict

    data = load_strict(text, source)
    return parse_vocabulary(data, source, base_dir, (*seen, key))


def load_vocabulary(name_or_path: str | Path) -> Vocabulary:
    """A shipped vocabulary by name (``SHIPPED``) or a YAML file of the same layout (which may
    ``extends`` another)."""
    return _load(name_or_path)


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
