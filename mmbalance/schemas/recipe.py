"""The recipe: the single source of configuration for a run, validated by pydantic.

Unknown keys are errors (``extra="forbid"``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator


from mmbalance.schemas.balance import EMBEDDING_LABELS, BalanceSpec, NoBalance, StrictModel, balance_methods, embedding_pairs
from mmbalance.schemas.embed import EmbedSpec
from mmbalance.schemas.export import ExportFormat, ExportOptions
from mmbalance.schemas.storage import StorageSpec
from mmbalance.schemas.tags import AttributeSpec, LabelSpec
from mmbalance.schemas.yaml_loader import load_strict


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


class ColumnMap(StrictModel):
    """Which input column plays which role. Only ``uid`` is required."""

    uid: str = "uid"
    caption: str | None = None
    image: str | None = None
    image_embedding: str | None = None
    text_embedding: str | None = None
    utility: str | None = None
    # img2dataset writes status=success|failed_to_download|...; other values are rejected.
    status: str | None = None


class InputSpec(StrictModel):
    path: str | None = None
    # parquet | webdataset (tars of <key>.<ext> members) | auto: webdataset where the input holds tars
    format: Literal["auto", "parquet", "webdataset"] = "auto"
    columns: ColumnMap = ColumnMap()
    # Expected embedding dimension; None = taken from the first shard that has embeddings.
    embedding_dim: int | None = Field(default=None, gt=0)
    extensions: list[str] = [".parquet"]

    def for_format(self, fmt: str, present: tuple[str, ...] = ()) -> "InputSpec":
        """This input as read in ``fmt``: a WebDataset sample's key is the uid and img2dataset's
        ``status`` (its json's or side table's, when ``present``) is checked, unless the recipe maps
        those roles itself."""
        columns = self.columns
        if fmt == "webdataset":
            given = columns.model_fields_set
            defaults = {"uid": "__key__", **({"status": "status"} if "status" in present else {})}
            columns = columns.model_copy(update={k: v for k, v in defaults.items() if k not in given})
        return self.model_copy(update={"format": fmt, "columns": columns})


class ClusterSpec(StrictModel):
    """Concept clusters as a label: spherical k-means (faiss) fit on the sample, assigned to every row.

    A list ``k`` is swept and the best silhouette kept (R&B Regroup). The label's values are the
    cluster ids as strings; balance steps may name ``name`` like any label.
    """

    name: str = "cluster"
    embedding: Literal["image", "text", "mean"] = "image"
    k: int | list[int] = Field(default=100)
    niter: int = Field(default=100, gt=0)  # most Lloyd iterations; a fit stops earlier once converged
    tol: float = Field(default=1e-5, ge=0)  # converged: an iteration gains less than this (relative)
    nredo: int | None = Field(default=None, gt=0)  # restarts, the best mean cosine kept; None: several while cheap
    # split-and-merge trials after the restarts (a centroid moved to split another's cluster, kept if
    # the mean cosine rises); None: max(8, k/8) while cheap, below two-level k; 0: off
    swaps: int | None = Field(default=None, ge=0)
    # flat: one k-means over all points; two_level: ~sqrt(k) coarse cells, each split in proportion
    # to its size (minutes instead of hours at k = 10^4); auto: two_level from k = 1000
    method: Literal["auto", "flat", "two_level"] = "auto"
    coarse_k: int | None = Field(default=None, gt=0)  # two-level coarse cells (default round(sqrt(k)))
    seed: int = 0
    silhouette_rows: int = Field(default=10_000, gt=10)
    # hierarchical k-means (Vo et al.): cluster the centroids again into each of these k's, coarser
    # each time; adds labels <name>_l2, <name>_l3, ... (the leaf level is <name>)
    levels: list[int] = []
    resample_size: int = Field(default=0, ge=0)  # r points per centroid for resampling k-means (0: off)
    n_resamples: int = Field(default=10, ge=0)

    def level_names(self) -> list[str]:
        return [f"{self.name}_l{i}" for i in range(2, len(self.levels) + 2)]

    @model_validator(mode="after")
    def _levels(self):
        if self.levels:
            if not isinstance(self.k, int):
                raise ValueError("levels needs a single k (the finest level), not a sweep")
            ks = [self.k, *self.levels]
            if any(a <= b for a, b in zip(ks, ks[1:])):
                raise ValueError(f"levels must decrease from k: got {ks}")
        return self

    @field_validator("k")
    @classmethod
    def _positive_k(cls, k):
        ks = [k] if isinstance(k, int) else k
        if not ks or min(ks) < 1:
            raise ValueError("k must be a positive integer or a non-empty list of them")
        return k


class SubclassSpec(StrictModel):
    """SBCL subclasses of a label: class c splits into max(1, floor(n_c / max(min n, m0))) k-means
    clusters of its embeddings; values are '<class>/<j>', unique across classes."""

    name: str
    of: str  # a label (or cluster) name
    m0: int = Field(default=10, gt=0)
    embedding: Literal["image", "text", "mean"] = "image"
    niter: int = Field(default=100, gt=0)  # most Lloyd iterations per class (stops once converged)
    # fit points per subclass: the sample is stratified by class with caps min(n_c, K_c * this)
    points_per_subclass: int = Field(default=64, gt=0)
    seed: int = 0


class ReportSpec(StrictModel):
    """What the report computes beyond counts."""

    html: bool = True  # OUT/report.html
    # leakage probes: predict each attribute from the labels and from the embeddings, before/after
    leakage: bool = True
    leakage_rows: int = Field(default=20_000, gt=100)


class SampleSpec(StrictModel):
    """The uniform sample that clustering and R&B fit on (bottom-k by a hash of uid and seed)."""

    size: int = Field(default=100_000, gt=0)
    seed: int = 0


class ExportSpec(ExportOptions):
    """Trainer-ready outputs written at the end of a run (``mmbalance export OUT`` rewrites them)."""

    seed: int = 0  # seeds the stochastic rounding of weights into repeat counts
    formats: list[ExportFormat] = ["parquet"]


class ExecutionSpec(StrictModel):
    """How the run executes; the CLI flags override these."""

    executor: Literal["ray", "local"] = "ray"
    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    # Rows per Arrow batch inside a shard: bounds memory per worker (4k-25k measured fastest).
    batch_rows: int = Field(default=4096, gt=0)
    object_store_memory_mb: int | None = Field(default=None, gt=0)
    # Rows per dedup bucket: bounds the memory of the global duplicate-uid check.
    dedup_bucket_rows: int = Field(default=1_000_000, gt=0)
    # Verify the CRC32 of every Parquet page read from the input (pages written without one are
    # read as before; `mmbalance inspect` and `validate` name such shards): a flipped bit becomes an
    # error naming the file instead of a silently wrong value (its cost: benchmarks/bench_checksums.py).
    verify_checksums: bool = True
    # A unit of work that fails on unreadable data: stop the run (stop), or record it under
    # OUT/_failed/<stage>/, let the stage's other units finish, then exit non-zero (defer); a
    # rerun retries only the failed units.
    on_unit_error: Literal["stop", "defer"] = "stop"


class Recipe(StrictModel):
    input: InputSpec = InputSpec()
    # make (or ingest .npz) image/text embeddings instead of reading mapped embedding columns
    embed: EmbedSpec | None = None
    attributes: list[AttributeSpec] = []
    labels: list[LabelSpec] = []
    clusters: list[ClusterSpec] = []
    subclasses: list[SubclassSpec] = []
    sample: SampleSpec = SampleSpec()
    report: ReportSpec = ReportSpec()
    # one step, or several applied in order: each balances the distribution the previous ones
    # produced (its counts are their weighted counts) and the weights multiply
    balance: BalanceSpec | list[BalanceSpec] = NoBalance(method="none")
    export: ExportSpec = ExportSpec()
    execution: ExecutionSpec = ExecutionSpec()
    storage: StorageSpec = StorageSpec()  # object-store endpoint settings (never credentials)

    @model_validator(mode="after")
    def _check_references(self) -> "Recipe":
        names = [a.name for a in self.attributes] + self.label_names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"attribute/label/cluster names must be unique, repeated: {dupes}")
        uses_caption = [t.name for t in [*self.attributes, *self.labels] if {"caption", "metadata"} & set(t.sources)]
        if uses_caption and not self.input.columns.caption:
            raise ValueError(f"{uses_caption[0]} is tagged from captions but input.columns.caption is not set")
        cols = self.input.columns
        if self.embed is not None:
            if cols.image_embedding or cols.text_embedding:
                raise ValueError("embed is set and input.columns maps embedding columns: use one source of embeddings")
            if self.embed.uses_model and not (cols.image or cols.caption):
                raise ValueError("embed runs a model over images and captions: set input.columns.image and/or caption")
            if self.embed.uses_model and not cols.image and not self.embed.text_only:
                raise ValueError("embed runs the image tower, but input.columns.image is not set: map the image column "
                                 "(img2dataset: jpg) or set embed.text_only: true to embed captions only")
            if self.embed.text_only and cols.image:
                raise ValueError("embed.text_only is set and input.columns.image maps images: drop one of them")
        made = self.embed is not None
        image_made = made and not (self.embed.uses_model and self.embed.text_only)
        embeddings = {"image": cols.image_embedding or image_made, "text": cols.text_embedding or made}
        for spec in [*self.clusters, *self.subclasses]:
            need = ["image", "text"] if spec.embedding == "mean" else [spec.embedding]
            for side in need:
                if not embeddings[side] and made:
                    raise ValueError(f"{spec.name} clusters {spec.embedding} embeddings but embed.text_only makes none")
                if not embeddings[side]:
                    raise ValueError(f"{spec.name} clusters {spec.embedding} embeddings but input.columns.{side}_embedding is not set")
        for spec in (t for t in [*self.attributes, *self.labels] if t.deferred):
            for side in spec.zero_shot.sides:
                if not embeddings[side] and made:
                    raise ValueError(f"{spec.name}.zero_shot uses image embeddings but embed.text_only makes none")
                if not embeddings[side]:
                    raise ValueError(f"{spec.name}.zero_shot uses {side} embeddings: set input.columns.{side}_embedding or embed")
            has_encoder = spec.zero_shot.model is not None or (self.embed is not None and self.embed.uses_model)
            if not has_encoder:
                raise ValueError(f"{spec.name}.zero_shot needs a text tower for its prompts: set zero_shot.model/pretrained "
                                 "(the model that made the embeddings) or an embed model")
        order = [lab.name for lab in self.labels] + [c.name for c in self.clusters]
        for spec in self.subclasses:
            if spec.of not in order:
                raise ValueError(f"subclasses {spec.name}: 'of' names '{spec.of}', which is not a label or cluster")
        self._check_balance_names()
        return self

    def balance_steps(self) -> list[Any]:
        return list(self.balance) if isinstance(self.balance, list) else [self.balance]

    def balance_method(self) -> str:
        return "+".join(step.method for step in self.balance_steps())

    def _check_balance_names(self) -> None:
        if isinstance(self.balance, list) and not self.balance:
            raise ValueError("balance: an empty list of steps (use {method: none})")
        steps = self.balance_steps()
        for i, step in enumerate(steps):
            self._check_step_names(step, "balance" if not isinstance(self.balance, list) else f"balance.{i}")
            if embedding_pairs(step) and i < len(steps) - 1:
                raise ValueError(f"balance.{i}: embedding moments weigh every row on its own, so their m4 step "
                                 "must be the last balance step")

    def _check_step_names(self, step, prefix: str) -> None:
        """Every attribute or label a balance step names must exist, so typos fail before any work."""
        attrs = {a.name: a for a in self.attributes}
        labels = self.label_names()

        def need(kind: str, key: str, name: str) -> None:
            pool = list(attrs) if kind == "attribute" else labels
            if name not in pool:
                raise ValueError(f"{key} names '{name}', which is not {'an' if kind == 'attribute' else 'a'} {kind} ({kind}s: {pool})")

        metadata = [lab.name for lab in self.metadata_labels()]
        if getattr(step, "hierarchical", False):
            spec = next((c for c in self.clusters if c.name == step.by), None)
            if spec is None or not spec.levels:
                raise ValueError(f"{prefix}.hierarchical needs by to name a cluster with levels, got '{step.by}'")
        if getattr(step, "by", None) in metadata:
            if step.method != "cap" or len(self.balance_steps()) > 1:
                raise ValueError(f"{prefix}.by names metadata label '{step.by}': only a single cap step balances metadata entries")
        elif getattr(step, "by", None) is not None:
            need("label", f"{prefix}.by", step.by)
        if getattr(step, "attribute", None) is not None:
            need("attribute", f"{prefix}.attribute", step.attribute)
        if getattr(step, "label", None) is not None:
            need("label", f"{prefix}.label", step.label)
        for i, pair in enumerate(getattr(step, "associate", None) or []):
            need("attribute", f"{prefix}.associate.{i}", pair[0])
            if pair[1] in EMBEDDING_LABELS:
                side = pair[1].split(".", 1)[1]
                if not (self.embed is not None or getattr(self.input.columns, f"{side}_embedding")):
                    raise ValueError(f"{prefix}.associate.{i} names {pair[1]} but input.columns.{side}_embedding is not set "
                                     "(and no embed step makes it)")
                continue
            need("label", f"{prefix}.associate.{i}", pair[1])
        for name in getattr(step, "label_targets", None) or {}:
            need("label", f"{prefix}.label_targets", name)
        for name, target in (getattr(step, "targets", None) or {}).items():
            need("attribute", f"{prefix}.targets", name)
            unknown = sorted(set(target) - set(attrs[name].values))
            if unknown:
                raise ValueError(f"{prefix}.targets.{name} has values not in its attribute: {unknown}")

    def label_names(self) -> list[str]:
        """Single-valued labels y (signature columns) in order: declared, clusters, subclasses."""
        declared = [lab.name for lab in self.labels if not lab.is_metadata]
        clusters = [n for c in self.clusters for n in (c.name, *c.level_names())]
        return declared + clusters + [s.name for s in self.subclasses]

    def metadata_labels(self) -> list[Any]:
        """Multi-valued labels (MetaCLIP entries): counted per entry, not part of signatures."""
        return [lab for lab in self.labels if lab.is_metadata]

    def deferred_tags(self) -> list[Any]:
        return [t for t in [*self.attributes, *self.labels] if t.deferred]

    def needs_derive(self) -> bool:
        """Tags computed after the scan from embeddings: clusters, subclasses, zero-shot."""
        return bool(self.clusters or self.subclasses or self.deferred_tags())

    def embedding_moments(self) -> dict[str, int]:
        """Embedding sides that M4 steps bound moments against, with the principal components to fit."""
        sides: dict[str, int] = {}
        for step in self.balance_steps():
            for _, side in embedding_pairs(step):
                sides[side] = max(sides.get(side, 0), step.embedding_components)
        return sides

    def sample_size(self) -> int:
        """Rows in the fit sample: ``sample.size`` when something is fitted on it, else only what
        the leakage probes read (a smaller sample keeps the scan cheap)."""
        fitted = self.needs_derive() or any(s.method == "rnb" for s in self.balance_steps()) or bool(self.embedding_moments())
        return self.sample.size if fitted else min(self.sample.size, self.report.leakage_rows)

    def needs_sample(self) -> bool:
        leakage = bool(self.attributes) and self.report.leakage
        return bool(self.needs_derive() or leakage or any(s.method == "rnb" for s in self.balance_steps())
                    or self.embedding_moments())

    def attribute_targets(self) -> dict[str, dict[str, float]]:
        """Target shares per attribute value: from the balance step, else uniform over values."""
        given: dict[str, dict[str, float]] = {}
        for step in self.balance_steps():  # a later step's targets win: they shape the result
            given.update(getattr(step, "targets", None) or {})
        out = {}
        for attr in self.attributes:
            if attr.name in given:
                out[attr.name] = {v: float(given[attr.name].get(v, 0.0)) for v in attr.values}
            else:
                out[attr.name] = {v: 1.0 / len(attr.values) for v in attr.values}
        return out

    def fingerprint(self) -> str:
        """Hash of what determines the results (execution settings excluded: they must not)."""
        # execution settings never change results; neither do the embed actors' resources
        # nor where the files are, how they are reached, or the format (the shards' fingerprints are the data)
        payload = self.model_dump(mode="json", exclude={
            "execution": True, "input": {"path", "format"}, "report": {"html"}, "storage": True,
            "embed": {"actors", "num_cpus", "num_gpus", "decode_threads"},
        })
        if payload.get("embed") and not payload["embed"].get("text_only"):
            payload["embed"].pop("text_only", None)  # unset: the fingerprints of earlier runs stay valid
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def for_format(self, fmt: str, present: tuple[str, ...] = ()) -> "Recipe":
        """The recipe as a run over shards of ``fmt`` (with columns ``present``) uses it."""
        return self.model_copy(update={"input": self.input.for_format(fmt, present)})


def _location(parts: tuple) -> str:
    # pydantic puts union branches and the discriminator value into locations:
    # balance.tagged-union[...].cap.foo -> balance.foo; balance.list[...].1.tagged-union[...].cap.foo -> balance.1.foo
    kept: list[str] = []
    for i, p in enumerate(parts):
        branch = isinstance(p, str) and p.startswith(("tagged-union[", "list[", "function-"))
        before = parts[i - 1] if i else None
        after_union = isinstance(before, str) and before.startswith("tagged-union[")
        after_item = isinstance(before, int) and i >= 2 and str(parts[i - 2]).startswith("list[")
        if not (branch or ((after_union or after_item) and p in balance_methods())):
            kept.append(str(p))
    return ".".join(kept)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through unions, lists, Annotated, Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _keys_at(parts: tuple) -> list[str]:
    """The keys a recipe accepts at a validation error's location (pydantic's raw ``loc`` without the
    key itself): one close-match list for every section, list item and balance method."""
    models: list[type[BaseModel]] = [Recipe]
    for i, part in enumerate(parts):
        if isinstance(part, int) or str(part).startswith(("tagged-union[", "list[", "function-")):
            continue
        after_union = i and str(parts[i - 1]).startswith("tagged-union[")
        after_item = i >= 2 and isinstance(parts[i - 1], int) and str(parts[i - 2]).startswith("list[tagged-union[")
        if after_union or after_item:  # the branch its discriminator names (method: m4)
            models = [m for m in models if part in typing.get_args(m.model_fields.get("method", Field()).annotation)]
            continue
        models = [m for model in models if part in model.model_fields for m in _models_in(model.model_fields[part].annotation)]
    return sorted({name for m in models for name in m.model_fields})


def format_error(source: str, err: ValidationError) -> str:
    errors = err.errors()
    # one step or a list of steps: drop the errors of the branch the input was clearly not meant for
    shapes = {"list_type", "dict_type", "model_type", "model_attributes_type"}
    errors = [e for e in errors if e["type"] not in shapes] or errors
    # an unknown key explains the "field required" next to it (a typo): report it first
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), _keys_at(first["loc"][:-1]), n=1)
        msg = f"unknown key '{loc}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    elif first["type"] == "union_tag_invalid":
        msg = f"{loc}.method: {first['msg']}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        msg = f"{loc}: {text}" if loc else text
    more = len(errors) - 1
    suffix = f" (+{more} more)" if more else ""
    return f"{source}: {msg}{suffix}"


def parse_recipe(data: dict[str, Any] | None, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data or {})
    except ValidationError as err:
        raise RecipeError(format_error(source, err)) from None


def recipe_mapping(text: str, source: str) -> dict[str, Any] | None:
    """A recipe file's YAML (the strict loader's rules), which must be a mapping."""
    data = load_strict(text, source, RecipeError)
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def recipe_from_yaml(text: str, source: str) -> Recipe:
    return parse_recipe(recipe_mapping(text, source), source)


EXAMPLE_RECIPE = """\
# mmbalance recipe: every key is optional except where noted. Unknown keys are an error.
input:
  path: corpus/                 # shard directory or URI (s3://, gs://, ...); the CLI argument overrides it
  # format: auto                # parquet | webdataset (tars of <key>.jpg/.txt/.json) | auto: tars if present
  columns:                      # which input column plays which role
    uid: uid                    # required, unique across the corpus (img2dataset: key)
    caption: caption
    image_embedding: image_emb  # list or fixed_size_list of float16/float32, same dim everywhere
    text_embedding: text_emb
    # image: jpg                # image bytes, {bytes, path} struct, or a path
    # utility: clip_score       # a quality prior u >= 0
    # status: status            # img2dataset status: rows not 'success' are rejected with a reason
  # embedding_dim: 512          # default: taken from the first shard
# embed:                        # make embeddings instead of mapping columns (needs the embed extra)
#   model: ViT-B-32
#   pretrained: laion2b_s34b_b79k   # an open_clip tag, hf-hub:org/repo, or a checkpoint path
#   num_gpus: 1                  # per actor; actors: 4
attributes:                     # sensitive attributes s: a closed set of values; null = not applicable
  - {name: gender, source: column, column: gender, values: [woman, man]}
  # from captions and images, combined:
  # - {name: gender, source: [caption, zero_shot], values: [woman, man], combine: any,
  #    caption: {vocabulary: perceived_gender}, zero_shot: {vocabulary: perceived_gender, sides: [image]}}
labels:                         # concept labels y: one-hot over `values`, or over the values seen
  - {name: occupation, source: column, column: occupation}
  # - {name: entry, source: metadata, metadata: {entries: metadata.txt}}   # MetaCLIP entries (multi-hot)
# clusters:                     # concepts from embeddings, usable as labels
#   - {name: concept, embedding: image, k: [500, 1000, 2000], levels: []}
# subclasses:                   # SBCL: split each class into subclasses of about the tail's size
#   - {name: occupation_sub, of: occupation, m0: 10}
# sample: {size: 100000, seed: 0}   # what clusters, R&B and the leakage probes fit on
balance:                        # steps, each on the distribution the previous ones produced (weights multiply)
  - method: cap                 # MetaCLIP per-value cap: thins head occupations, does NOT hold attribute shares
    by: occupation              # a label, cluster or metadata label
    cap: 10000                  # t: a value with count c is kept with probability t / max(c, t)
  - method: m4                  # M4 moment matching on what the cap produced:
    targets: {gender: {woman: 0.5, man: 0.5}}          # representation: gender shares (RB)
    associate: [[gender, occupation]]                  # association: gender independent of occupation (AB)
    tolerance: {representation: 0.002, association: 0.005}
    retention: 0.6              # keep about this share of rows (max_weight 1, the default: subsample only)
    on_infeasible: max_retention   # or error: when the bounds can't all hold at this retention
    # per-label parity |P(woman | value) - 0.5| <= 0.05 (values under min_support rows pooled) and
    # moments against the image embedding's principal components (an m4 step with them comes last):
    # associate: [[gender, concept], [gender, embedding.image]], min_support: 50, embedding_components: 64
    # tolerance: {association: null, association_per_label: 0.05, association_embedding: 0.01}
  # other methods: none | waterfill | reweigh | rake | rnb (README: the recipe); e.g.
  # - {method: waterfill, by: concept, retention: 0.8}
# report: {html: true, leakage: true}
export:
  seed: 0                       # seeds the stochastic rounding of weights into repeat counts
  formats: [parquet]             # + csv, webdataset, wids, bigvision, hf, streaming, datacomp
  # domain: {by: occupation}    # one webdataset/jsonl/stream per value
# storage:                      # object stores (s3://, gs://): endpoint settings; credentials come from the environment
#   endpoint: http://minio.internal:9000
#   create_bucket: true         # create a missing output bucket
execution:                      # how to run; never changes the results
  executor: ray                 # ray (a local Ray is started unless address/RAY_ADDRESS is set) | local
  # address: ray://head:10001
  batch_rows: 4096              # rows per Arrow batch inside a shard (bounds worker memory)
  # verify_checksums: true      # check input Parquet page CRCs (shards written without them read as before)
"""
