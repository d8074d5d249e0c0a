"""The export-format registry is the only list of formats: the recipe's names, the registered
writers (found by importing the package's modules, no list to edit) and what the CLI says agree."""

from __future__ import annotations

import inspect

from mmbalance import cli
from mmbalance.operators.export import FORMATS, format_dirs, load_formats
from mmbalance.operators.export.base import Exporter
from mmbalance.schemas.export import EXPORT_FORMATS


def test_the_recipe_names_exactly_the_registered_formats():
    assert load_formats() is FORMATS
    assert set(FORMATS) | {"parquet"} == set(EXPORT_FORMATS)  # parquet: the manifest itself, nothing to write
    for name, cls in FORMATS.items():
        assert issubclass(cls, Exporter) and cls.dir, name
    # formats sharing a writer (webdataset and wids) are written once
    assert [n for n, _ in format_dirs(["parquet", "webdataset", "wids", "csv"])] == ["webdataset", "csv"]


def test_the_cli_lists_the_registered_formats():
    trainer_formats = [f for f in EXPORT_FORMATS if f != "parquet"]
    help_text = next(p.default.help for p in inspect.signature(cli.export_cmd).parameters.values() if p.name == "formats")
    assert help_text.startswith(" | ".join(trainer_formats + ["parquet"]) + ";")
    assert f"no format: pass --format ({', '.join(trainer_formats)})" in inspect.getsource(cli.export_cmd)
