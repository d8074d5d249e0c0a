"""Hugging Face ``imagefolder`` per domain (``hf/<domain>/metadata.parquet`` + images), the
``interleave_datasets`` probabilities and ``hf/load_mixture.py``, a ready-to-run loader.

Every kept row is one image and one metadata row with its ``weight`` and ``repeats``. ``datasets``
has no per-sample weights, so with ``copies: repeats`` (the default) the loader expands each
domain by its ``repeats`` column with ``Dataset.select`` (an index mapping: nothing is copied):
``epoch()`` is every row exactly ``repeats`` times, shuffled; ``interleaved()`` draws domains with
probabilities equal to their share of the repeats, so every copy is equally likely. With
``copies: once`` the domains are interleaved with the target shares and rows within a domain are
drawn equally often (domain mixing only).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.operators.export.base import ExportContext, Exporter, OpenOutput, Rows, register_format
from mmbalance.io.store import parquet_options

LOADER = '''"""Load the mmbalance mixture with Hugging Face datasets (written by mmbalance export).

epoch(): every kept row exactly `repeats` times (copies: repeats) or once (copies: once), shuffled.
interleaved(): an endless-style mixture, domains drawn with interleave.json's probabilities.
"""
import json
import pathlib

import numpy as np
from datasets import concatenate_datasets, interleave_datasets, load_dataset

SPEC = json.loads((pathlib.Path(__file__).parent / "interleave.json").read_text())


def domains():
    """One dataset per domain; with copies: repeats each row appears `repeats` times (select, no copy)."""
    parts = [load_dataset("imagefolder", data_dir=d, split="train") for d in SPEC["data_dirs"]]
    if SPEC["copies"] == "repeats":
        parts = [p.select(np.repeat(np.arange(len(p)), p["repeats"])) for p in parts]
    return parts


def epoch(seed=SPEC["seed"]):
    return concatenate_datasets(domains()).shuffle(seed=seed)


def interleaved(seed=SPEC["seed"]):
    return interleave_datasets(domains(), probabilities=SPEC["probabilities"], seed=seed,
                               stopping_strategy=SPEC["stopping_strategy"])


if __name__ == "__main__":
    print(epoch())
'''

METADATA_SCHEMA = pa.schema([
    pa.field("file_name", pa.string()), pa.field("text", pa.string()), pa.field("uid", pa.string()),
    pa.field("domain", pa.string()), pa.field("weight", pa.float64()), pa.field("repeats", pa.int32()),
])


@register_format("hf")
class HfExporter(Exporter):
    dir = "hf"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("hf export needs captions and image bytes (input.columns.caption/image)")
        self.outs: dict[int, tuple[OpenOutput, pq.ParquetWriter]] = {}
        self.counts = [0] * len(ctx.domains)
        self.repeats = [0] * len(ctx.domains)
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        data, ext, why = rows.media()
        cols: dict[int, dict[str, list]] = {}
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            name = f"images/{rows.key[i]}.{ext[i]}"
            self.store.write_bytes(self.ctx.domains[d].dir, name, data=data[i])
            col = cols.setdefault(d, {f.name: [] for f in METADATA_SCHEMA})
            col["file_name"].append(name)
            col["text"].append(rows.caption[i])  # type: ignore[index]
            col["uid"].append(rows.uid[i])
            col["domain"].append(self.ctx.domains[d].name)
            col["weight"].append(float(rows.weight[i]))
            col["repeats"].append(int(rows.repeats[i]))
            self.counts[d] += 1
            self.repeats[d] += int(rows.repeats[i])
        for d, col in cols.items():
            if d not in self.outs:
                out = OpenOutput(self.store, self.ctx.domains[d].dir, "metadata.parquet")
                self.outs[d] = (out, pq.ParquetWriter(out.stream, METADATA_SCHEMA, **parquet_options(METADATA_SCHEMA)))
            self.outs[d][1].write_table(pa.table(col, schema=METADATA_SCHEMA), row_group_size=65536)

    def close(self) -> dict[str, Any]:
        for out, writer in self.outs.values():
            writer.close()
            out.commit()
        live = [(j, d) for j, d in enumerate(self.ctx.domains) if self.counts[j] > 0]
        if self.ctx.options.copies == "repeats":
            mass = [float(self.repeats[j]) for j, _ in live]
        else:
            mass = [d.target_share for _, d in live]
        probs = [m / sum(mass) if sum(mass) else 0.0 for m in mass]
        dirs = [self.ctx.dest_path(self.dir, d.dir) for _, d in live]
        spec = {"data_dirs": dirs, "domains": [d.name for _, d in live], "probabilities": probs,
                "examples": [self.counts[j] for j, _ in live], "repeats": [self.repeats[j] for j, _ in live],
                "copies": self.ctx.options.copies, "seed": self.ctx.seed, "stopping_strategy": "all_exhausted"}
        self.store.write_json("interleave.json", obj=spec)
        self.store.write_bytes("load_mixture.py", data=LOADER.encode())
        summary = {"dir": self.ctx.dest_path(self.dir), **spec, "skipped": dict(sorted(self.skipped.items()))}
        return json.loads(json.dumps(summary))

    def abort(self) -> None:
        for out, writer in self.outs.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
            out.abort()
