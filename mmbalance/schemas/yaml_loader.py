"""YAML for the files users write (recipes, tag vocabularies): PyYAML's safe loader, stricter.

A key given twice in one mapping is an error naming both lines (PyYAML keeps the last one without
a word), and the YAML 1.1 boolean words (yes/no/on/off/true/false, any case) stay the strings they
were written as, so a value name such as ``no`` or ``true`` keeps its exact text. Pydantic reads
those words into ``bool`` fields itself, so recipe flags still work.

This module imports nothing else of mmbalance; ``mmbalance.data`` imports it where it reads a file.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A key given twice in one mapping; ``problem_mark`` is the second one."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys and keeps yes/no/on/off/true/false as strings."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges may override keys on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: the constructor below says so
                if first is not key_node.start_mark:
                    raise DuplicateKeyError(None, None, f"duplicate key '{key}' (first given on line {first.line + 1})",
                                            key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_strict(text: str, source: str, error: type[Exception] = ValueError) -> Any:
    """``text`` parsed with ``StrictLoader``; bad YAML raises ``error`` with one line naming
    ``source`` and the line: ``r.yaml: line 7 duplicate key 'cap' (first given on line 6)``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as err:
        raise error(f"{source}: line {err.problem_mark.line + 1} {err.problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{source}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
