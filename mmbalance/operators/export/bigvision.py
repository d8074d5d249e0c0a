"""big_vision ``bv:jsonl``: one ``<domain>.jsonl`` per domain and the mixture config snippet.

Each line: ``{"image": "<key>.<ext>", "text": caption, "uid": ..., "domain": ...}``; images go to
``bigvision/images/`` (once per row) and the snippet points ``fopen_keys`` there. big_vision mixes
datasets with ``tf.data.Dataset.sample_from_datasets`` (a per-example domain probability) and has no
per-sample weights, so with ``copies: repeats`` (the default) a row is one line per repeat and each
domain's weight is its share of the lines: every line is equally likely, so a row is drawn in
proportion to its repeats. With ``copies: once`` each row is one line and the weights are the
target shares (domain mixing only).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from mmbalance.operators.export.base import ExportContext, Exporter, OpenOutput, Rows, copy_key, register_format


@register_format("bigvision")
class BigVisionExporter(Exporter):
    dir = "bigvision"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("bigvision export needs captions and image bytes (input.columns.caption/image)")
        self.outs: dict[int, OpenOutput] = {}
        self.counts = [0] * len(ctx.domains)
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        data, ext, why = rows.media()
        lines: dict[int, list[str]] = {}
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            image = f"{rows.key[i]}.{ext[i]}"
            self.store.write_bytes("images", image, data=data[i])
            n = 1 if self.ctx.options.copies == "once" else int(rows.repeats[i])
            for c in range(n):
                key = rows.key[i] if self.ctx.options.copies == "once" else copy_key(rows.key[i], c)
                line = {"image": image, "text": rows.caption[i], "uid": rows.uid[i], "key": key,  # type: ignore[index]
                        "domain": self.ctx.domains[d].name}
                lines.setdefault(d, []).append(json.dumps(line, sort_keys=True, ensure_ascii=False))
            self.counts[d] += n
        for d, batch in lines.items():
            if d not in self.outs:
                self.outs[d] = OpenOutput(self.store, f"{self.ctx.domains[d].dir}.jsonl")
            self.outs[d].stream.write(("\n".join(batch) + "\n").encode("utf-8"))

    def close(self) -> dict[str, Any]:
        for out in self.outs.values():
            out.commit()
        live = [(d, n) for d, n in zip(self.ctx.domains, self.counts) if n > 0]
        mass = {d.name: (float(n) if self.ctx.options.copies == "repeats" else d.target_share) for d, n in live}
        total = sum(mass.values())
        weights = {name: (m / total if total else 0.0) for name, m in mass.items()}
        images = self.ctx.dest_path(self.dir, "images")
        lines = [
            "# big_vision input mixture written by mmbalance export; paste into get_config().",
            "# Set PP to your preprocessing string (e.g. decode|resize(224)|... on 'image' and 'text').",
            "PP = None",
            "config.input.data = {",
            *[f"    {d.dir!r}: {weights[d.name]!r},  # {d.name}" for d, _ in live],
            "}",
        ]
        for d, n in live:
            fname = self.ctx.dest_path(self.dir, f"{d.dir}.jsonl")
            lines.append(
                f"config.input[{d.dir!r}] = dict(data=dict(name='bv:jsonl', fname={fname!r}, "
                f"fopen_keys={{'image': {images!r}}}), pp=PP, "
                f"shuffle_buffer_size={self.ctx.options.bigvision.shuffle_buffer_size})  # {n} examples"
            )
        self.store.write_bytes("config_snippet.py", data=("\n".join(lines) + "\n").encode("utf-8"))
        summary = {
            "dir": self.ctx.dest_path(self.dir),
            "data": {d.dir: weights[d.name] for d, _ in live},
            "examples": {d.name: n for d, n in live},
            "skipped": dict(sorted(self.skipped.items())),
            "snippet": self.ctx.dest_path(self.dir, "config_snippet.py"),
        }
        self.store.write_json("export.json", obj=summary)
        return summary

    def abort(self) -> None:
        for out in self.outs.values():
            out.abort()
