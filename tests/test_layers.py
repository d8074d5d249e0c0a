"""The package's layers only point down, and no module reaches into another's private names.

Static: every import statement of every module under mmbalance/ (also those inside functions) is
read with ``ast``; nothing is imported. Layers, bottom first:

    schemas, data        data contracts, the recipe model, the shipped vocabularies
    io, errors, faiss_build   run store, filesystems, source reading; user errors; the faiss shim
    operators, mixer, synth   the work of each stage, as plain functions
    pipeline             wiring, execution, resume
    jobs, cli, console, inspect   entry points

A module may import from its own layer and the layers below it. A name that starts with one
underscore is private to its module: another module neither imports it nor reads it through the
module (``other._name``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmbalance"

LAYERS = {
    "schemas": 0, "data": 0,
    "io": 1, "errors": 1, "faiss_build": 1,
    "operators": 2, "mixer": 2, "synth": 2, "synth_images": 2,
    "pipeline": 3,
    "jobs": 4, "cli": 4, "console": 4, "inspect": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else -1  # the package itself: below everything


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every mmbalance import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "mmbalance":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "mmbalance"]
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The mmbalance modules an import statement reaches: the module, or its submodules named."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or [module]


def layer_violations() -> list[str]:
    found = []
    for name, path in MODULES.items():
        own = _layer(name)
        assert own is not None, f"{name}: not assigned to a layer (add it to LAYERS)"
        for line, target, names in _imports(path):
            for reached in _targets(target, names):
                layer = _layer(reached)
                assert layer is not None, f"{reached}: not assigned to a layer (add it to LAYERS)"
                if layer > own:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} imports {reached} (a higher layer)")
    return found


def private_violations() -> list[str]:
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local names bound to other mmbalance modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("mmbalance"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        bound[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: imports {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mmbalance.") and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__") and bound[node.value.id] != name):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: reads {bound[node.value.id]}.{node.attr}")
    return found


def test_layers_only_point_down():
    assert layer_violations() == []


def test_no_module_uses_another_modules_private_names():
    assert private_violations() == []


@pytest.mark.parametrize("source, expect", [
    ("from mmbalance.pipeline.stages import run\n", "imports mmbalance.pipeline.stages (a higher layer)"),
    ("def f():\n    from mmbalance.pipeline import plan\n", "imports mmbalance.pipeline.plan (a higher layer)"),
])
def test_an_upward_import_is_found(tmp_path, monkeypatch, source, expect):
    """The check fails where it should: an operator importing the pipeline, at module level or inside a function."""
    fake = PACKAGE / "operators" / "_layer_probe.py"
    monkeypatch.setitem(MODULES, "mmbalance.operators._layer_probe", fake)
    monkeypatch.setattr(Path, "read_text", _reading(fake, source))
    assert any(expect in v for v in layer_violations())


@pytest.mark.parametrize("source, expect", [
    ("from mmbalance.cli import _fail\n", "imports mmbalance.cli._fail"),
    ("from mmbalance.operators import validate\nvalidate._hidden(1)\n", "reads mmbalance.operators.validate._hidden"),
])
def test_a_private_import_is_found(monkeypatch, source, expect):
    fake = PACKAGE / "jobs" / "_private_probe.py"
    monkeypatch.setitem(MODULES, "mmbalance.jobs._private_probe", fake)
    monkeypatch.setattr(Path, "read_text", _reading(fake, source))
    assert any(expect in v for v in private_violations())


def _reading(fake: Path, source: str):
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        return source if self == fake else real(self, *args, **kwargs)

    return read_text
