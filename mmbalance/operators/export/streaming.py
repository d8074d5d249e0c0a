"""MosaicML streaming: MDS datasets per domain and the ``Stream`` list (``streaming/streams.json``).

MosaicML has no per-sample weights but a ``Stream`` can be repeated: with ``copies: repeats`` (the
default) a domain's rows are split by their repeat count r into ``<domain>/r<r>/`` and that stream
gets ``repeat: r``, so one epoch of ``StreamingDataset(streams=[Stream(**s) for s in streams])``
holds every kept row exactly ``repeats`` times and each image is stored once. With ``copies:
once`` there is one stream per domain with ``proportion: <target share>`` (domain mixing only).
The shards are written natively (``mds.py``); ``mosaicml-streaming`` is needed only to read them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mmbalance.operators.export.base import ExportContext, Exporter, Rows, register_format
from mmbalance.operators.export.mds import MDSShardWriter

COLUMNS = {"key": "str", "uid": "str", "caption": "str", "image": "bytes", "ext": "str", "domain": "str",
           "weight": "float64", "repeats": "int"}


@register_format("streaming")
class StreamingExporter(Exporter):
    dir = "streaming"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("streaming export needs captions and image bytes (input.columns.caption/image)")
        self.writers: dict[tuple[int, int], MDSShardWriter] = {}  # (domain, repeat class) -> writer
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        data, ext, why = rows.media()
        by_repeats = self.ctx.options.copies == "repeats"
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            r = int(rows.repeats[i]) if by_repeats else 0
            writer = self.writers.get((d, r))
            if writer is None:
                parts = (self.ctx.domains[d].dir, f"r{r}") if by_repeats else (self.ctx.domains[d].dir,)
                writer = self.writers[(d, r)] = MDSShardWriter(self.store, parts, COLUMNS, self.ctx.options.streaming.size_limit)
            writer.write({"key": rows.key[i], "uid": rows.uid[i], "caption": rows.caption[i],  # type: ignore[index]
                          "image": data[i], "ext": ext[i], "domain": self.ctx.domains[d].name,
                          "weight": float(rows.weight[i]), "repeats": int(rows.repeats[i])})

    def close(self) -> dict[str, Any]:
        streams = []
        by_repeats = self.ctx.options.copies == "repeats"
        live = sorted(self.writers)
        total_target = sum(self.ctx.domains[d].target_share for d in {d for d, _ in live})
        for d, r in live:
            w = self.writers[(d, r)]
            w.finish()
            domain = self.ctx.domains[d]
            stream: dict[str, Any] = {"local": self.ctx.dest_path(self.dir, *w.parts)}
            if by_repeats:
                stream["repeat"] = r
            else:
                stream["proportion"] = domain.target_share / total_target if total_target else 0.0
            streams.append(stream)
        self.store.write_json("streams.json", obj=streams)
        samples = {self.ctx.domains[d].name: 0 for d, _ in live}
        for (d, r), w in sorted(self.writers.items()):
            samples[self.ctx.domains[d].name] += w.samples * (r if by_repeats else 1)
        return {"dir": self.ctx.dest_path(self.dir), "streams": streams, "copies": self.ctx.options.copies,
                "epoch_samples": samples, "skipped": dict(sorted(self.skipped.items()))}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
