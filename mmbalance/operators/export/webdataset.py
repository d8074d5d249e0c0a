"""webdataset tar shards per domain, ``sizes.json``, a wids index and the open_clip command line.

Layout under ``DEST/webdataset/``: ``<domain>/<domain>-00000.tar`` ... with members
``{key}.{png|jpg|webp}``, ``{key}.txt`` (caption, UTF-8) and ``{key}.json`` (uid, domain, weight,
repeats, source shard and row); ``<domain>/sizes.json``; ``open_clip.json``; with ``wids``:
``wids.json`` (every shard) and ``wids-<domain>.json``, URLs relative to the index file.

open_clip's ``--train-data-upsampling-factors`` is a weight per *shard* (each source's weight is
copied to every shard its brace pattern expands to) and a drawn shard yields all its samples, so
domain i gets a share ``f_i n_i / sum_j f_j n_j`` of the samples (n_i: samples in its tars). The
factors are therefore ``f_i = target_share_i / n_i``, scaled so the largest is 1.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from collections import Counter
from typing import Any

from mmbalance.operators.export import ExportContext, Exporter, OpenOutput, Rows, copy_key, register_format


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _Hashing:
    """Counts and hashes the bytes going to a stream (sizes and md5 for the wids index)."""

    def __init__(self, stream):
        self.stream = stream
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data) -> int:
        self.md5.update(data)
        self.size += len(data)
        self.stream.write(data)
        return len(data)


class _DomainTars:
    def __init__(self, store, dirname: str, shard_size: int):
        self.store, self.dirname, self.shard_size = store, dirname, shard_size
        self.shards: list[dict[str, Any]] = []  # name, nsamples, filesize, md5sum
        self.out: OpenOutput | None = None
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def add(self, key: str, ext: str, image: bytes, caption: str, meta: dict[str, Any]) -> None:
        if self.tar is None or self.count >= self.shard_size:
            self.finish()
            name = f"{self.dirname}-{len(self.shards):05d}.tar"
            self.out = OpenOutput(self.store, self.dirname, name)
            self.hashing = _Hashing(self.out.stream)
            self.tar = tarfile.open(fileobj=self.hashing, mode="w|", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "nsamples": 0})
            self.count = 0
        _member(self.tar, f"{key}.{ext}", image)
        _member(self.tar, f"{key}.txt", caption.encode("utf-8"))
        _member(self.tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        self.count += 1
        self.shards[-1]["nsamples"] += 1

    def finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.out.commit()  # type: ignore[union-attr]
            self.shards[-1].update(filesize=self.hashing.size, md5sum=self.hashing.md5.hexdigest())
            self.tar = None

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()

    @property
    def samples(self) -> int:
        return sum(s["nsamples"] for s in self.shards)

    def pattern(self) -> str:
        n = len(self.shards)
        if n == 1:
            return f"{self.dirname}/{self.shards[0]['name']}"
        return f"{self.dirname}/{self.dirname}-{{00000..{n - 1:05d}}}.tar"


def upsampling_factors(targets: list[float], samples: list[int]) -> list[float]:
    """open_clip per-shard weights giving domain shares ``targets``: f_i = t_i / n_i, max 1."""
    raw = [t / n if n > 0 else 0.0 for t, n in zip(targets, samples)]
    top = max(raw, default=0.0)
    return [r / top if top > 0 else 0.0 for r in raw]


def realised_shares(factors: list[float], samples: list[int]) -> list[float]:
    mass = [f * n for f, n in zip(factors, samples)]
    total = sum(mass)
    return [m / total if total else 0.0 for m in mass]


@register_format("webdataset", "wids")
class WebdatasetExporter(Exporter):
    dir = "webdataset"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("webdataset export needs captions and image bytes (input.columns.caption/image)")
        size = ctx.options.webdataset.shard_size
        self.tars = [_DomainTars(store, d.dir, size) for d in ctx.domains]
        self.skipped: Counter[str] = Counter()

    def write(self, rows: Rows) -> None:
        data, ext, why = rows.media()
        copies = self.ctx.options.copies
        for i in range(len(rows)):
            if why[i] is not None:
                self.skipped[why[i]] += 1
                continue
            d = int(rows.domain[i])
            domain = self.ctx.domains[d]
            meta = {"uid": rows.uid[i], "domain": domain.name, "weight": float(rows.weight[i]),
                    "repeats": int(rows.repeats[i]), "shard": rows.shard, "row": int(rows.row[i])}
            if copies == "once":
                self.tars[d].add(rows.key[i], ext[i], data[i], rows.caption[i], meta)  # type: ignore[index,arg-type]
            else:
                for c in range(int(rows.repeats[i])):
                    self.tars[d].add(copy_key(rows.key[i], c), ext[i], data[i], rows.caption[i], meta)  # type: ignore[index,arg-type]

    def close(self) -> dict[str, Any]:
        for t in self.tars:
            t.finish()
        for t in self.tars:
            if t.shards:
                self.store.write_json(t.dirname, "sizes.json", obj={s["name"]: s["nsamples"] for s in t.shards})
        live = [(d, t) for d, t in zip(self.ctx.domains, self.tars) if t.samples > 0]
        targets = [d.target_share for d, _ in live]
        total_t = sum(targets)
        targets = [x / total_t for x in targets] if total_t else targets
        samples = [t.samples for _, t in live]
        factors = [float(f"{f:.6g}") for f in upsampling_factors(targets, samples)]
        realised = realised_shares(factors, samples)
        train_data = "::".join(self.ctx.dest_path(self.dir, t.pattern()) for _, t in live)
        factor_arg = "::".join(f"{f:.6g}" for f in factors)
        args = ["--train-data", train_data, "--dataset-type", "webdataset",
                "--train-data-upsampling-factors", factor_arg, "--dataset-resampled",
                "--train-num-samples", str(self.ctx.epoch_size)]
        summary: dict[str, Any] = {
            "dir": self.ctx.dest_path(self.dir),
            "domains": {d.name: {"dir": d.dir, "shards": len(t.shards), "samples": t.samples,
                                 "target_share": tgt, "factor": f, "realised_share": r}
                        for (d, t), tgt, f, r in zip(live, targets, factors, realised)},
            "empty_domains": [d.name for d, t in zip(self.ctx.domains, self.tars) if t.samples == 0],
            "skipped": dict(sorted(self.skipped.items())),
            "copies": self.ctx.options.copies,
            "open_clip_args": args,
            "open_clip_command": "python -m open_clip_train.main " + " ".join(shlex.quote(a) for a in args),
        }
        self.store.write_json("open_clip.json", obj=summary)
        all_shards = []
        for d, t in live:
            entries = [{"url": f"{t.dirname}/{s['name']}", "nsamples": s["nsamples"], "filesize": s["filesize"],
                        "md5sum": s["md5sum"]} for s in t.shards]
            all_shards += entries
            self.store.write_json(f"wids-{t.dirname}.json", obj={
                "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": d.name, "shardlist": entries})
        self.store.write_json("wids.json", obj={"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                "name": "mmbalance", "shardlist": all_shards})
        summary["wids"] = self.ctx.dest_path(self.dir, "wids.json")
        return summary

    def abort(self) -> None:
        for t in self.tars:
            t.abort()
