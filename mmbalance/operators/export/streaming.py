"""MosaicML streaming (optional): MDS shards per domain and the stream list with proportions.

Needs ``mosaicml-streaming`` (``import streaming``); without it the format is skipped with a
message and the other formats still finish. ``streaming/streams.json`` lists
``{"local": <domain dir>, "proportion": <target share>}``; ``StreamingDataset(streams=[Stream(**s)
for s in streams])`` then samples each domain with its share.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mmbalance.operators.export import ExportContext, Exporter, ExportSkipped, Rows, copy_key, register_format


@register_format("streaming")
class StreamingExporter(Exporter):
    dir = "streaming"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if importlib.util.find_spec("streaming") is None:
            raise ExportSkipped("mosaicml-streaming is not installed (pip install mosaicml-streaming); streaming export skipped")
        if not isinstance(store.fs, pafs.LocalFileSystem):
            raise ExportSkipped("streaming export writes MDS shards to a local directory only")
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("streaming export needs captions and image bytes (input.columns.caption/image)")
        self.tmp = Path(tempfile.mkdtemp(prefix="mmbalance-mds-"))
        self.writers: dict[int, Any] = {}
        self.counts = [0] * len(ctx.domains)
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        from streaming import MDSWriter

        data, ext, why = rows.media()
        columns = {"key": "str", "uid": "str", "caption": "str", "image": "bytes", "ext": "str", "domain": "str"}
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            if d not in self.writers:
                self.writers[d] = MDSWriter(out=str(self.tmp / self.ctx.domains[d].dir), columns=columns,
                                            size_limit=self.ctx.options.streaming.size_limit)
            n = 1 if self.ctx.options.copies == "once" else int(rows.repeats[i])
            for c in range(n):
                key = rows.key[i] if n == 1 and self.ctx.options.copies == "once" else copy_key(rows.key[i], c)
                self.writers[d].write({"key": key, "uid": rows.uid[i], "caption": rows.caption[i],  # type: ignore[index]
                                       "image": data[i], "ext": ext[i], "domain": self.ctx.domains[d].name})
            self.counts[d] += n

    def close(self) -> dict[str, Any]:
        for w in self.writers.values():
            w.finish()
        for d in self.writers:
            src = self.tmp / self.ctx.domains[d].dir
            for f in sorted(src.rglob("*")):
                if f.is_file():
                    self.store._write_bytes((self.ctx.domains[d].dir, *f.relative_to(src).parts), f.read_bytes())
        shutil.rmtree(self.tmp, ignore_errors=True)
        live = [(d, n) for d, n in zip(self.ctx.domains, self.counts) if n > 0]
        total = sum(d.target_share for d, _ in live)
        streams = [{"local": self.ctx.dest_path(self.dir, d.dir), "proportion": d.target_share / total if total else 0.0}
                   for d, _ in live]
        self.store.write_json("streams.json", obj=streams)
        return {"dir": self.ctx.dest_path(self.dir), "streams": streams, "skipped": dict(sorted(self.skipped.items()))}

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
