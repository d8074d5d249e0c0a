"""webdataset tar shards per domain, ``sizes.json``, a wids index and the open_clip command line.

Layout under ``DEST/webdataset/``: ``<domain>/<domain>-00000.tar`` ... with members
``{key}.{png|jpg|webp}``, ``{key}.txt`` (caption, UTF-8) and ``{key}.json`` (uid, domain, weight,
repeats, source shard and row); ``<domain>/sizes.json``; ``open_clip.json``; with ``wids``:
``wids.json`` (every shard) and ``wids-<domain>.json``, URLs relative to the index file, and
``wids-weights.npy`` (one draw weight per sample of ``wids.json``, in its order).

open_clip reads tars and has no per-sample weights, so with ``copies: repeats`` (the default) a row
is written once per repeat (keys ``<key>_<copy>``) and every tar gets the same upsampling factor:
each copy is equally likely, so each row is drawn in proportion to its repeats and an epoch over
``wids.json`` holds it exactly ``repeats`` times. With ``copies: once`` each kept row is written
once and only the domain shares are mixed: ``--train-data-upsampling-factors`` is a weight per
*tar* (a source's weight is copied to every tar its brace pattern expands to) and a drawn tar
yields all its samples, so domain i gets ``f_i n_i / sum_j f_j n_j`` of the samples (n_i: samples
in its tars); the factors are ``f_i = target_share_i / n_i``, scaled so the largest is 1.

Tars of a domain differ in size by at most one sample; their size bounds the per-epoch share
deviation (``epoch.py``), which ``open_clip.json`` and ``mixture.json`` state.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import tarfile
from collections import Counter
from typing import Any

import numpy as np

from mmbalance.operators.export.base import ExportContext, Exporter, OpenOutput, Rows, copy_key, register_format, trainer_url
from mmbalance.operators.export.epoch import balanced_sizes, share_deviation, tar_size


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
    def __init__(self, store, dirname: str, planned: list[int], shard_size: int):
        self.store, self.dirname, self.shard_size = store, dirname, shard_size
        self.planned = planned  # sizes of the tars, in order; more samples than planned get shard_size tars
        self.shards: list[dict[str, Any]] = []  # name, nsamples, filesize, md5sum
        self.out: OpenOutput | None = None
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def add(self, key: str, ext: str, image: bytes, caption: str, meta: dict[str, Any]) -> None:
        if self.tar is None or self.count >= self._capacity(len(self.shards) - 1):
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

    def _capacity(self, index: int) -> int:
        return self.planned[index] if 0 <= index < len(self.planned) else self.shard_size

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


def _bound_note(source: str, min_shard_size: int) -> str:
    if source == "min_shard_size":
        return (f"tars of min_shard_size ({min_shard_size}) samples exceed the bound at this epoch size: "
                "raise --epoch-size, or lower webdataset.min_shard_size (smaller tars, more requests per epoch)")
    return ("even one-sample tars exceed the bound: an epoch this short cannot hold the shares closer "
            "(sampling alone gives sqrt(t (1 - t) / N)); raise --epoch-size or max_share_deviation")


def upsampling_factors(targets: list[float], samples: list[int]) -> list[float]:
    """open_clip per-shard weights giving domain shares ``targets``: f_i = t_i / n_i, max 1."""
    raw = [t / n if n > 0 else 0.0 for t, n in zip(targets, samples)]
    top = max(raw, default=0.0)
    return [r / top if top > 0 else 0.0 for r in raw]


def realised_shares(factors: list[float], samples: list[int]) -> list[float]:
    mass = [f * n for f, n in zip(factors, samples)]
    total = sum(mass)
    return [m / total if total else 0.0 for m in mass]


def plan_shard_size(ctx: ExportContext) -> tuple[int, str]:
    """Samples per tar (the option, or the largest within the share-deviation bound but at least
    ``min_shard_size``) and which setting fixed it: ``option``, ``max_share_deviation`` or
    ``min_shard_size`` (the bound alone would have asked for smaller tars)."""
    opts = ctx.options.webdataset
    if opts.shard_size is not None:
        return opts.shard_size, "option"
    if ctx.options.copies == "repeats":
        mass = [float(d.repeats) for d in ctx.domains]
    else:
        mass = [d.target_share if d.kept else 0.0 for d in ctx.domains]
    total = sum(mass)
    shares = [m / total if total else 0.0 for m in mass]
    return tar_size(shares, ctx.epoch_size, opts.max_share_deviation, opts.min_shard_size, opts.max_shard_size)


@register_format("webdataset", "wids")
class WebdatasetExporter(Exporter):
    dir = "webdataset"

    def __init__(self, ctx: ExportContext, store):
        super().__init__(ctx, store)
        if not ctx.caption_column or not ctx.image_column:
            raise ValueError("webdataset export needs captions and image bytes (input.columns.caption/image)")
        self.shard_size, self.shard_size_from = plan_shard_size(ctx)
        repeats = ctx.options.copies == "repeats"
        self.tars = [_DomainTars(store, d.dir, balanced_sizes(d.repeats if repeats else d.kept, self.shard_size), self.shard_size)
                     for d in ctx.domains]
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
        samples = [t.samples for _, t in live]
        if self.ctx.options.copies == "repeats":
            # every copy equally likely: a row is drawn in proportion to its repeats
            targets = [n / sum(samples) for n in samples]
            factors = [1.0] * len(live)
        else:
            targets = [d.target_share for d, _ in live]
            total_t = sum(targets)
            targets = [x / total_t for x in targets] if total_t else targets
            factors = [float(f"{f:.6g}") for f in upsampling_factors(targets, samples)]
        realised = realised_shares(factors, samples)
        # on an object store each source is a pipe: URL (webdataset opens no s3:// itself)
        train_data = "::".join(trainer_url(self.ctx.dest_path(self.dir, t.pattern())) for _, t in live)
        factor_arg = "::".join(f"{f:.6g}" for f in factors)
        args = ["--train-data", train_data, "--dataset-type", "webdataset",
                "--train-data-upsampling-factors", factor_arg, "--dataset-resampled",
                "--train-num-samples", str(self.ctx.epoch_size)]
        tar_domain = [j for j, (_, t) in enumerate(live) for _ in t.shards]
        tar_sizes = [s["nsamples"] for _, t in live for s in t.shards]
        tar_weights = [factors[j] for j in tar_domain]
        _, sds = share_deviation(tar_domain, tar_sizes, tar_weights, self.ctx.epoch_size, len(live))
        opts = self.ctx.options.webdataset
        epoch = {
            "train_num_samples": self.ctx.epoch_size,
            "shard_size": self.shard_size,
            "shard_size_from": self.shard_size_from,
            "min_shard_size": opts.min_shard_size,
            "max_share_deviation": opts.max_share_deviation,
            "share_deviation": {d.name: round(sd, 9) for (d, _), sd in zip(live, sds)},
            "max_expected_share_deviation": round(max(sds, default=0.0), 9),
            "within_bound": max(sds, default=0.0) <= opts.max_share_deviation,
            **({} if max(sds, default=0.0) <= opts.max_share_deviation or opts.shard_size is not None else {
                "note": _bound_note(self.shard_size_from, opts.min_shard_size)}),
            "meaning": "standard deviation of a domain's share of one open_clip --dataset-resampled epoch of "
                       "train_num_samples samples (whole tars drawn with replacement by factor); an upper estimate",
        }
        summary: dict[str, Any] = {
            "dir": self.ctx.dest_path(self.dir),
            "domains": {d.name: {"dir": d.dir, "shards": len(t.shards), "samples": t.samples,
                                 "target_share": tgt, "factor": f, "realised_share": r}
                        for (d, t), tgt, f, r in zip(live, targets, factors, realised)},
            "empty_domains": [d.name for d, t in zip(self.ctx.domains, self.tars) if t.samples == 0],
            "skipped": dict(sorted(self.skipped.items())),
            "copies": self.ctx.options.copies,
            "epoch": epoch,
            "open_clip_args": args,
            "open_clip_command": "python -m open_clip_train.main " + " ".join(shlex.quote(a) for a in args),
        }
        self.store.write_json("open_clip.json", obj=summary)
        all_shards = []
        per_sample: list[np.ndarray] = []
        for (d, t), f in zip(live, factors):
            entries = [{"url": f"{t.dirname}/{s['name']}", "nsamples": s["nsamples"], "filesize": s["filesize"],
                        "md5sum": s["md5sum"]} for s in t.shards]
            all_shards += entries
            per_sample.append(np.full(t.samples, f))  # a sample's draw weight is its tar's factor
            self.store.write_json(f"wids-{t.dirname}.json", obj={
                "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": d.name, "shardlist": entries})
        self.store.write_json("wids.json", obj={"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                "name": "mmbalance", "shardlist": all_shards})
        weights = np.concatenate(per_sample) if per_sample else np.empty(0)
        self.store.write_bytes("wids-weights.npy", data=_npy_bytes(weights / weights.sum() if weights.size else weights))
        summary["wids"] = self.ctx.dest_path(self.dir, "wids.json")
        summary["wids_weights"] = self.ctx.dest_path(self.dir, "wids-weights.npy")
        return summary

    def abort(self) -> None:
        for t in self.tars:
            t.abort()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
