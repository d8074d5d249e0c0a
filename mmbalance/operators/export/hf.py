"""Hugging Face ``imagefolder`` per domain (``hf/<domain>/metadata.parquet`` + images) and the
``interleave_datasets`` probabilities that realise the mixture.

``interleave_datasets`` draws the source of each next example with the given probabilities, so
they are the target shares. ``hf/load_mixture.py`` is a ready-to-run loader.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmbalance.operators.export import ExportContext, Exporter, OpenOutput, Rows, copy_key, register_format
from mmbalance.pipeline.store import parquet_options

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
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        data, ext, why = rows.media()
        cols: dict[int, dict[str, list]] = {}
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            n = 1 if self.ctx.options.copies == "once" else int(rows.repeats[i])
            for c in range(n):
                key = rows.key[i] if self.ctx.options.copies == "once" else copy_key(rows.key[i], c)
                name = f"images/{key}.{ext[i]}"
                self.store._write_bytes((self.ctx.domains[d].dir, name), data[i])
                col = cols.setdefault(d, {f.name: [] for f in METADATA_SCHEMA})
                col["file_name"].append(name)
                col["text"].append(rows.caption[i])  # type: ignore[index]
                col["uid"].append(rows.uid[i])
                col["domain"].append(self.ctx.domains[d].name)
                col["weight"].append(float(rows.weight[i]))
                col["repeats"].append(int(rows.repeats[i]))
            self.counts[d] += n
        for d, col in cols.items():
            if d not in self.outs:
                out = OpenOutput(self.store, self.ctx.domains[d].dir, "metadata.parquet")
                self.outs[d] = (out, pq.ParquetWriter(out.stream, METADATA_SCHEMA, **parquet_options(METADATA_SCHEMA)))
            self.outs[d][1].write_table(pa.table(col, schema=METADATA_SCHEMA), row_group_size=65536)

    def close(self) -> dict[str, Any]:
        for out, writer in self.outs.values():
            writer.close()
            out.commit()
        live = [(d, n) for d, n in zip(self.ctx.domains, self.counts) if n > 0]
        total = sum(d.target_share for d, _ in live)
        probs = [d.target_share / total if total else 0.0 for d, _ in live]
        dirs = [self.ctx.dest_path(self.dir, d.dir) for d, _ in live]
        spec = {"data_dirs": dirs, "domains": [d.name for d, _ in live], "probabilities": probs,
                "examples": [n for _, n in live], "seed": self.ctx.seed, "stopping_strategy": "all_exhausted"}
        self.store.write_json("interleave.json", obj=spec)
        script = (
            '"""Load the mmbalance mixture with Hugging Face datasets (written by mmbalance export)."""\n'
            "import json, pathlib\n"
            "from datasets import interleave_datasets, load_dataset\n\n"
            "spec = json.loads((pathlib.Path(__file__).parent / 'interleave.json').read_text())\n"
            "parts = [load_dataset('imagefolder', data_dir=d, split='train') for d in spec['data_dirs']]\n"
            "mixture = interleave_datasets(parts, probabilities=spec['probabilities'], seed=spec['seed'],\n"
            "                              stopping_strategy=spec['stopping_strategy'])\n"
        )
        self.store._write_bytes(("load_mixture.py",), script.encode())
        summary = {"dir": self.ctx.dest_path(self.dir), **spec, "skipped": dict(sorted(self.skipped.items()))}
        return json.loads(json.dumps(summary))

    def abort(self) -> None:
        for out, writer in self.outs.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
            out.abort()
