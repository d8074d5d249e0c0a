"""The recipe: the single source of configuration for a run, validated by pydantic.

Unknown keys are errors (``extra="forbid"``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator


from mmbalance.schemas.balance import EMBEDDING_LABELS, BalanceSpec, NoBalance, StrictModel, balance_methods, embedding_pairs
from mmbalance.schemas.embed import EmbedSpec
from mmbalance.schemas.export import ExportFormat, ExportOptions
from mmbalance.schemas.yaml_loader import DuplicateKeyError, StrictLoader, load_strict


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
    columns: ColumnMap = ColumnMap()
    # Expected embedding dimension; None = taken from the first shard that has embeddings.
    embedding_dim: int | None = Field(default=None, gt=0)
    extensions: list[str] = [".parquet"]


TagSource = Literal["column", "caption", "zero_shot", "metadata"]


class CaptionSourceSpec(StrictModel):
    """Tags from caption words: whole-word, case-insensitive lexicon matching (mmbalance/data)."""

    vocabulary: str  # a shipped name (perceived_gender, age_group, occupation) or a YAML path
    # several values in one caption ("he and she"): null (unknown) or the most frequent (majority)
    multiple: Literal["unknown", "majority"] = "unknown"
    negation_window: int = Field(default=2, ge=0)  # "no women", "without a man": 0 turns it off
    longest_only: bool = True  # "old man" is a senior, not also a man


class MetadataSourceSpec(StrictModel):
    """MetaCLIP metadata: entries (one per line) matched as whole words in captions; a row gets
    every entry it matches (multi-hot), and ``cap`` over this label is MetaCLIP balancing."""

    entries: str  # a file path (or a shipped list name), one entry per line
    longest_only: bool = False  # False = MetaCLIP: an entry inside a longer one fires too


class ZeroShotSourceSpec(StrictModel):
    """Tags from embeddings: scores of prompt-ensemble embeddings of each value plus "none"."""

    vocabulary: str  # a shipped name or a YAML path (values with prompts, none_prompts)
    sides: list[Literal["image", "text"]] = ["image"]  # image embeddings, caption (text) embeddings
    # auto: as the model was trained: sigmoid with its learned scale and bias for SigLIP (a
    # logit_bias), softmax over cosine / temperature for CLIP
    scoring: Literal["auto", "softmax", "sigmoid"] = "auto"
    temperature: float = Field(default=0.01, gt=0)  # softmax only; CLIP's logit scale 100
    threshold: float = Field(default=0.5, ge=0, le=1)  # below it (or "none" winning): no tag
    # the text tower that encodes the prompts: default the recipe's embed model; with mapped
    # embedding columns name the model that made them (open_clip name and pretrained tag/path)
    model: str | None = None
    pretrained: str | None = None

    @field_validator("sides")
    @classmethod
    def _sides(cls, sides):
        if not sides or len(set(sides)) != len(sides):
            raise ValueError("sides must list image and/or text once each")
        return sides


class TaggedSpec(StrictModel):
    """Shared by attributes and labels: where the tag comes from."""

    name: str
    source: TagSource | list[TagSource] = "column"
    column: str | None = None
    caption: CaptionSourceSpec | None = None
    zero_shot: ZeroShotSourceSpec | None = None
    metadata: MetadataSourceSpec | None = None
    # several sources: any = the value every tagging source agrees on; all = every source tags and
    # agrees; vote = the most frequent value (ties give null); image / text = any over that modality
    # (captions and given columns count as text); mean = mean of the zero-shot scores and one-hot tags
    combine: Literal["any", "all", "vote", "image", "text", "mean"] = "any"

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @model_validator(mode="after")
    def _source_settings(self):
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ValueError("source must name each of column, caption at most once")
        if "caption" in self.sources and self.caption is None:
            raise ValueError("source caption needs a caption: {vocabulary: ...} section")
        if "zero_shot" in self.sources and self.zero_shot is None:
            raise ValueError("source zero_shot needs a zero_shot: {vocabulary: ...} section")
        if "metadata" in self.sources:
            if self.metadata is None:
                raise ValueError("source metadata needs a metadata: {entries: FILE} section")
            if len(self.sources) > 1:
                raise ValueError("source metadata gives many entries per row: it cannot be combined with other sources")
        return self

    @property
    def is_metadata(self) -> bool:
        return "metadata" in self.sources

    @property
    def deferred(self) -> bool:
        """Tagged after the embeddings exist (zero-shot), not during the scan."""
        return "zero_shot" in self.sources

    def source_names(self) -> list[str]:
        """Sources as the combiner sees them: zero-shot counts once per side."""
        out = []
        for source in self.sources:
            out += [f"zero_shot_{side}" for side in self.zero_shot.sides] if source == "zero_shot" else [source]
        return out


class AttributeSpec(TaggedSpec):
    """A sensitive attribute s: a closed set of values; null means "not applicable" (no person).
    With a caption or zero-shot vocabulary ``values`` may be omitted: the vocabulary's values."""

    values: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _values_from_vocabulary(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("values") is not None:
            return data
        sources = data.get("source", "column")
        sources = [sources] if isinstance(sources, str) else list(sources or [])
        found: dict[str, tuple[str, ...]] = {}
        for source in ("caption", "zero_shot"):
            section = data.get(source)
            name = section.get("vocabulary") if isinstance(section, dict) else getattr(section, "vocabulary", None)
            if source in sources and isinstance(name, str):
                from mmbalance.data import load_vocabulary

                try:
                    found[source] = load_vocabulary(name).values
                except (ValueError, OSError) as err:
                    raise ValueError(f"{data.get('name')}.{source}.vocabulary: {err}") from None
        if not found:
            return data  # "values: Field required" names the missing key
        if len(set(found.values())) > 1:
            raise ValueError("values: the caption and zero_shot vocabularies have different values; list the values to use")
        return {**data, "values": list(next(iter(found.values())))}

    @model_validator(mode="after")
    def _not_metadata(self):
        if self.is_metadata:
            raise ValueError("source metadata is for labels (concepts), not attributes")
        return self

    @field_validator("values")
    @classmethod
    def _unique_values(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("values must be unique")
        return values


class LabelSpec(TaggedSpec):
    """A concept label y: one-hot over ``values`` or, when omitted, over the values seen."""

    values: list[str] | None = None


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
    # read as before): a flipped bit becomes an error naming the file instead of a silently wrong value.
    verify_checksums: bool = False
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
        made = self.embed is not None
        embeddings = {"image": cols.image_embedding or made, "text": cols.text_embedding or made}
        for spec in [*self.clusters, *self.subclasses]:
            need = ["image", "text"] if spec.embedding == "mean" else [spec.embedding]
            for side in need:
                if not embeddings[side]:
                    raise ValueError(f"{spec.name} clusters {spec.embedding} embeddings but input.columns.{side}_embedding is not set")
        for spec in (t for t in [*self.attributes, *self.labels] if t.deferred):
            for side in spec.zero_shot.sides:
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
        payload = self.model_dump(mode="json", exclude={
            "execution": True, "input": {"path"}, "report": {"html"},
            "embed": {"actors", "num_cpus", "num_gpus", "decode_threads"},
        })
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def _format_error(source: str, err: ValidationError) -> str:
    errors = err.errors()
    # one step or a list of steps: drop the errors of the branch the input was clearly not meant for
    shapes = {"list_type", "dict_type", "model_type", "model_attributes_type"}
    errors = [e for e in errors if e["type"] not in shapes] or errors
    # an unknown key explains the "field required" next to it (a typo): report it first
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = loc.rsplit(".", 1)[0] if "." in loc else ""
        missing = [_location(e["loc"]).rsplit(".", 1)[-1] for e in errors if e["type"] == "missing"
                   and (_location(e["loc"]).rsplit(".", 1)[0] if "." in _location(e["loc"]) else "") == parent]
        close = difflib.get_close_matches(loc.rsplit(".", 1)[-1], missing, n=1)
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
        raise RecipeError(_format_error(source, err)) from None


# the recipe's YAML rules (duplicate keys are errors, yes/no stay strings) live in yaml_loader,
# shared with the tag vocabularies; the names stay importable from here
RecipeLoader = StrictLoader
_DuplicateKey = DuplicateKeyError


def recipe_mapping(text: str, source: str) -> dict[str, Any] | None:
    """A recipe file's YAML (the strict loader's rules), which must be a mapping."""
    data = load_strict(text, source, RecipeError)
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def recipe_from_yaml(text: str, source: str) -> Recipe:
    return parse_recipe(recipe_mapping(text, source), source)


def load_recipe(path: str | Path) -> Recipe:
    """Load a recipe from a local path or a pyarrow filesystem URI (s3://bucket/recipe.yaml)."""
    return recipe_from_yaml(read_recipe_text(path), str(path))


def read_recipe_text(path: str | Path) -> str:
    """A recipe file's text from a local path or a pyarrow filesystem URI; unreadable: RecipeError."""
    path = str(path)
    try:
        if "://" in path:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(inner) as stream:
                text = stream.read().decode()
        else:
            text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read recipe ({getattr(err, 'strerror', None) or err})") from None
    return text


EXAMPLE_RECIPE = """\
# mmbalance recipe: every key is optional except where noted. Unknown keys are an error.
input:
  path: corpus/                 # shard directory or URI (s3://, gs://, ...); the CLI argument overrides it
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
balance:
  method: cap                   # none | cap (MetaCLIP per-value cap)
  by: occupation                # a label name
  cap: 1000                     # t: a value with count c is kept with probability t / max(c, t)
  unlabeled: keep               # rows without a value: keep (weight 1) or drop (MetaCLIP)
  # targets: {gender: {woman: 0.5, man: 0.5}}   # shares the report measures RB against (default uniform)
# or several steps, each on the distribution the previous ones produced:
# balance:
#   - {method: waterfill, by: concept, retention: 0.8}
#   - {method: m4, targets: {gender: {woman: 0.5, man: 0.5}}, associate: [[gender, occupation]],
#      tolerance: {representation: 0.01, association: 0.01}, retention: 0.9, max_weight: 1.0}
# report: {html: true, leakage: true}
export:
  seed: 0                       # seeds the stochastic rounding of weights into repeat counts
  formats: [parquet]             # + csv, webdataset, wids, bigvision, hf, streaming, datacomp
  # domain: {by: occupation}    # one webdataset/jsonl/stream per value
execution:                      # how to run; never changes the results
  executor: ray                 # ray (a local Ray is started unless address/RAY_ADDRESS is set) | local
  # address: ray://head:10001
  batch_rows: 4096              # rows per Arrow batch inside a shard (bounds worker memory)
"""
