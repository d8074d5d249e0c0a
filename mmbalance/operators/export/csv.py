"""open_clip CSV/TSV (``--dataset-type csv``): ``filepath``, ``title`` (+ ``uid``, ``domain``).

A sample with ``repeats = r`` is ``r`` identical rows, so an epoch over the file is the manifest.
Image bytes in the corpus are written once per sample to ``csv/images/<key>.<ext>``; image paths in
the corpus are referenced where they are.
"""

from __future__ import annotations

import csv
import io
import shlex
from collections import Counter
from typing import Any

from mmbalance.operators.export.base import ExportContext, Exporter, OpenOutput, Rows, register_format


@register_format("csv")
class CsvExporter(Exporter):
    dir = "csv"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column:
            raise ValueError("csv export needs captions: set input.columns.caption in the recipe or export caption_column")
        if not ctx.image_column:
            raise ValueError("csv export needs images: set input.columns.image in the recipe or export image_column")
        self.tsv = ctx.options.csv.separator == "\t"
        self.name = "train.tsv" if self.tsv else "train.csv"
        self.out = OpenOutput(store, self.name)
        self._header = False
        self.rows = 0
        self.images = 0
        self.skipped: Counter[str] = Counter()
        self.per_domain = [0] * len(ctx.domains)

    def _filepath(self, rows: Rows, i: int, ext: str | None) -> str:
        value = rows.image[i]  # type: ignore[index]
        if isinstance(value, str):  # the corpus holds paths: use them
            return rows.images.resolve(value)  # type: ignore[union-attr]
        name = f"{rows.key[i]}.{ext}"
        self.store.write_bytes("images", name, data=value)
        self.images += 1
        if self.ctx.options.csv.absolute_paths:
            return self.ctx.dest_path(self.dir, "images", name)
        return f"images/{name}"

    def write(self, rows: Rows) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=self.ctx.options.csv.separator, lineterminator="\n")
        if not self._header:
            w.writerow(["filepath", "title", "uid", "domain"])
            self._header = True
        by_path = any(isinstance(v, str) for v in rows.image or [])
        if not by_path:
            data, ext, why = rows.media()
        for i in range(len(rows)):
            caption = rows.caption[i] if rows.caption is not None else None
            if by_path and isinstance(rows.image[i], str):  # type: ignore[index]
                reason, e = (None if caption is not None else "no caption"), None
            elif by_path:
                reason = "no image"
            else:
                reason, e = why[i], ext[i]
            if reason is not None:
                self.skipped[reason] += 1
                continue
            path = self._filepath(rows, i, e)
            domain = self.ctx.domains[int(rows.domain[i])]
            for _ in range(int(rows.repeats[i])):
                w.writerow([path, caption, rows.uid[i], domain.name])
            self.rows += int(rows.repeats[i])
            self.per_domain[int(rows.domain[i])] += int(rows.repeats[i])
        self.out.stream.write(buf.getvalue().encode("utf-8"))

    def close(self) -> dict[str, Any]:
        if not self._header:
            self.out.stream.write(b"filepath\ttitle\tuid\tdomain\n" if self.tsv else b"filepath,title,uid,domain\n")
        self.out.commit()
        path = self.ctx.dest_path(self.dir, self.name)
        args = ["--train-data", path, "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title"]
        if not self.tsv:
            args += ["--csv-separator", ","]
        total = sum(self.per_domain)
        summary = {
            "file": path,
            "rows": self.rows,
            "image_files": self.images,
            "skipped": dict(sorted(self.skipped.items())),
            "realised_shares": {d.name: (n / total if total else 0.0) for d, n in zip(self.ctx.domains, self.per_domain)},
            "open_clip_args": args,
            "open_clip_command": "python -m open_clip_train.main " + " ".join(shlex.quote(a) for a in args),
        }
        if "://" in path:
            summary["note"] = ("open_clip's csv loader opens each image path with PIL, which reads local files only: "
                               f"copy {self.ctx.dest_path(self.dir)} to a local disk and give --train-data the local "
                               "train file, or export webdataset, which streams from the store")
        self.store.write_json("export.json", obj=summary)
        return summary

    def abort(self) -> None:
        self.out.abort()
