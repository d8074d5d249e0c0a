"""Export options: which trainer-ready files ``mmbalance export`` writes from a run's manifest.

``ExportOptions`` holds every option; the recipe's ``export`` section can subclass it and add
``seed`` and ``formats: list[ExportFormat]``. All paths are relative to the run directory unless
they contain ``://`` or start with ``/``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmbalance.schemas.balance import StrictModel

# parquet: the canonical manifest itself (nothing to write); the rest are trainer formats
ExportFormat = Literal["parquet", "csv", "webdataset", "wids", "bigvision", "hf", "streaming", "datacomp"]
EXPORT_FORMATS: tuple[str, ...] = ExportFormat.__args__  # type: ignore[attr-defined]


class DomainOptions(StrictModel):
    """How rows are grouped into domains (one tar set / jsonl / stream per domain).

    ``by`` names a tag (column ``tag.<by>`` of ``OUT/tags/``); ``column`` names any other column of
    the per-shard tables in ``OUT/<source>/`` (e.g. ``cluster_id`` in ``clusters/``). Neither: one
    domain holding every row.
    """

    by: str | None = None
    column: str | None = None
    source: str = "tags"  # run subdirectory with <shard_id>.parquet tables keyed by ``row``
    unlabeled: str = "unlabeled"  # domain of rows whose value is null

    def column_name(self) -> str | None:
        if self.by is not None and self.column is not None:
            raise ValueError("export.domain: give by (a tag) or column, not both")
        return f"tag.{self.by}" if self.by is not None else self.column


class CsvOptions(StrictModel):
    """open_clip ``--dataset-type csv``: columns ``filepath`` and ``title``, one row per repeat."""

    separator: Literal["\t", ","] = "\t"
    # images as files under csv/images/ when the corpus holds bytes; absolute paths in the file
    absolute_paths: bool = True


class WebdatasetOptions(StrictModel):
    """Tar shards per domain: ``{key}.png|jpg|webp``, ``{key}.txt``, ``{key}.json``.

    open_clip's ``--dataset-resampled`` draws whole tars with replacement, so an epoch's domain
    shares are noisy by about ``sqrt(t (1 - t) s / N)`` (t: share, s: samples per tar, N:
    ``--train-num-samples``). Without ``shard_size`` every tar holds the largest size up to
    ``max_shard_size`` that keeps that standard deviation within ``max_share_deviation``, but never
    fewer than ``min_shard_size`` samples: every tar is a request to write and one per draw to read,
    so an epoch too short for the bound (under ~250,000 samples at the defaults) gets tars of
    ``min_shard_size`` and ``open_clip.json`` states the larger deviation they give.
    """

    shard_size: int | None = Field(default=None, gt=0)  # samples per tar; None: sized from the bound
    max_shard_size: int = Field(default=10_000, gt=0)
    # ~5-10 MB of web images: a request's fixed latency stays a small part of its transfer
    min_shard_size: int = Field(default=100, gt=0)
    max_share_deviation: float = Field(default=0.01, gt=0, lt=1)  # per-epoch share standard deviation

    @model_validator(mode="after")
    def _sizes_ordered(self) -> WebdatasetOptions:
        if self.min_shard_size > self.max_shard_size:
            raise ValueError(f"min_shard_size {self.min_shard_size} exceeds max_shard_size {self.max_shard_size}")
        return self


class BigVisionOptions(StrictModel):
    shuffle_buffer_size: int = Field(default=50_000, gt=0)  # per-domain buffer in the snippet


class StreamingOptions(StrictModel):
    size_limit: int = Field(default=1 << 26, gt=0, lt=1 << 32)  # MDS shard bytes (offsets are uint32)


class DatacompOptions(StrictModel):
    """DataComp's resharder keys samples by ``divmod(int(uid, 16), 2**64)``: uids must be hex.

    ``non_hex_uids: error`` stops the export at the first other uid; ``sha256`` lists the first
    128 bits of its SHA-256 instead (with ``uid_map.parquet``), for tools that key samples that way.
    """

    non_hex_uids: Literal["error", "sha256"] = "error"


class ExportOptions(StrictModel):
    dest: str = "export"  # output directory (relative to the run directory, or absolute/URI)
    input: str | None = None  # where the source shards are now (default: run.json ``input``)
    image_column: str | None = None  # default: recipe input.columns.image, else a column 'image'
    caption_column: str | None = None  # default: recipe input.columns.caption
    domain: DomainOptions = DomainOptions()
    # samples per epoch (open_clip --train-num-samples); default: the manifest's total repeats
    epoch_size: int | None = Field(default=None, gt=0)
    # repeats: every kept row is drawn in proportion to its repeats (copies where the trainer has no
    # per-sample weights, repeat counts where it has them); once: each kept row once, domain mixing only
    copies: Literal["once", "repeats"] = "repeats"
    batch_rows: int = Field(default=8192, gt=0)  # source rows per read (bounds memory)
    csv: CsvOptions = CsvOptions()
    webdataset: WebdatasetOptions = WebdatasetOptions()
    bigvision: BigVisionOptions = BigVisionOptions()
    streaming: StreamingOptions = StreamingOptions()
    datacomp: DatacompOptions = DatacompOptions()
