"""Balance steps of the recipe: one pydantic model per ``balance.method``.

A new method adds its model here, to ``BalanceSpec``, and registers a solver in
``mmbalance.operators.solve`` under the same name.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoBalance(StrictModel):
    """Keep every valid row once (weight 1): useful to audit a corpus."""

    method: Literal["none"]


class CapBalance(StrictModel):
    """MetaCLIP balancing: each value e of ``by`` is kept with probability t / max(count_e, t)."""

    method: Literal["cap"]
    by: str
    cap: int = Field(gt=0)
    # Rows with no value for ``by``: MetaCLIP drops them ("drop"); keeping them is the safer default.
    unlabeled: Literal["keep", "drop"] = "keep"
    targets: dict[str, dict[str, float]] | None = None


def _check_shares(targets: dict[str, dict[str, float]], key: str) -> dict[str, dict[str, float]]:
    """Target shares of one column: each in [0, 1], summing to 1 (unlisted values get share 0)."""
    for name, shares in targets.items():
        if not shares:
            raise ValueError(f"{key}.{name} lists no values")
        bad = sorted(v for v, p in shares.items() if not 0.0 <= p <= 1.0)
        if bad:
            raise ValueError(f"{key}.{name} shares must be in [0, 1] (bad: {bad})")
        total = sum(shares.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{key}.{name} shares must sum to 1, got {total:.6g}")
    return targets


EMBEDDING_LABELS = ("embedding.image", "embedding.text")  # [attribute, embedding.<side>] in associate


class M4Tolerance(StrictModel):
    """Bounds on the moments of docs/algorithms.md sections 1 and 8.

    ``representation`` and ``association`` are shares of the carrying rows' weight (None turns the
    global association bound off); ``association_per_label`` bounds |P_w(s = v | y = j) - pi_v| for
    every label value j (a share of the value's own carrying weight); ``association_embedding``
    bounds the attribute's moment against each principal component z_k of an embedding in units of
    sd(z_k) times the carrying weight."""

    representation: float = Field(default=0.01, ge=0.0, le=1.0)
    association: float | None = Field(default=0.01, ge=0.0, le=1.0)
    association_per_label: float | None = Field(default=None, ge=0.0, le=1.0)
    association_embedding: float = Field(default=0.01, ge=0.0)


class M4Balance(StrictModel):
    """M4 moment matching (docs/algorithms.md section 1, our formulation), solved exactly in the dual.

    ``targets`` gives first-order constraints per attribute; ``associate`` lists [attribute, label]
    pairs for second-order constraints (proxies are more labels), and [attribute, embedding.image]
    or [attribute, embedding.text] for moments against an embedding's principal components (the
    per-row streaming path). An attribute that is associated but has no target is held at its
    observed prevalence.
    """

    method: Literal["m4"]
    targets: dict[str, dict[str, float]] = {}
    associate: list[tuple[str, str]] = []
    tolerance: M4Tolerance = M4Tolerance()
    retention: float = Field(default=0.9, gt=0.0)  # eta: baseline keep rate and budget share
    max_weight: float = Field(default=1.0, gt=0.0)  # Q: 1 = subsample only, > 1 allows repeats
    objective: Literal["l2", "kl"] = "l2"
    budget: bool = True  # enforce sum q = n * retention
    # V: cap on the duals; the best-effort solution when the constraints cannot all hold
    enforcement: float | None = Field(default=None, gt=0.0)
    # when the constraints are infeasible at ``retention`` (and no enforcement is set): fail, or
    # solve at the largest feasible retention instead
    on_infeasible: Literal["error", "max_retention"] = "error"
    # with a utility column: each row's own baseline (exact; the streaming path, one pass over the
    # rows per dual evaluation) or the signature's mean utility (compressed, approximate)
    utility: Literal["sample", "signature"] = "sample"
    # hold each associated label value's mass among the rows carrying the attribute at its
    # baseline (exact equalities); an attribute without targets is then centred at its prevalence
    # among rows carrying both it and the label: with the KL objective, eps = 0 and no budget this
    # is Kamiran-Calders reweighing over those rows (null labels included), label marginals held
    hold_labels: bool = False
    # per-label parity: label values with fewer attribute-carrying rows are pooled into one bound per label
    min_support: int = Field(default=50, ge=1)
    # embedding moments: top principal components of each associated embedding (all d when d is smaller)
    embedding_components: int = Field(default=64, ge=1)

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return _check_shares(targets, "targets")

    @model_validator(mode="after")
    def _consistent(self) -> "M4Balance":
        if not self.targets and not self.associate:
            raise ValueError("m4 needs balance.targets or balance.associate (no constraint to enforce)")
        labels = [lab for _, lab in self.associate if lab not in EMBEDDING_LABELS]
        if labels and self.tolerance.association is None and self.tolerance.association_per_label is None:
            raise ValueError("balance.tolerance: association and association_per_label are both off, so the "
                             f"[attribute, label] pairs ({labels[0]}, ...) bound nothing; set one of them")
        if self.budget and self.retention > self.max_weight:
            raise ValueError(f"balance.retention {self.retention} exceeds balance.max_weight {self.max_weight}")
        return self


def embedding_pairs(step) -> list[tuple[str, str]]:
    """(attribute, side) of a step's [attribute, embedding.<side>] pairs, in order."""
    pairs = [(a, lab.split(".", 1)[1]) for a, lab in getattr(step, "associate", None) or [] if lab in EMBEDDING_LABELS]
    return list(dict.fromkeys(pairs))


class ReweighBalance(StrictModel):
    """Kamiran-Calders reweighing: cell (s, y) gets n_s n_y / (n n_sy); rows missing s or y keep 1."""

    method: Literal["reweigh"]
    attribute: str
    label: str


class RakeBalance(StrictModel):
    """Raking (iterative proportional fitting) to target shares of attributes and labels."""

    method: Literal["rake"]
    targets: dict[str, dict[str, float]] = {}  # attributes (also what the report measures RB against)
    label_targets: dict[str, dict[str, float]] = {}
    tolerance: float = Field(default=1e-6, gt=0.0)  # largest share error at convergence
    max_iterations: int = Field(default=1000, gt=0)
    retention: float = Field(default=1.0, gt=0.0)  # weights are scaled so sum w = n * retention

    @field_validator("targets", "label_targets")
    @classmethod
    def _shares(cls, targets: dict[str, dict[str, float]], info) -> dict[str, dict[str, float]]:
        return _check_shares(targets, info.field_name)

    @model_validator(mode="after")
    def _some(self) -> "RakeBalance":
        if not self.targets and not self.label_targets:
            raise ValueError("rake needs balance.targets or balance.label_targets")
        return self


class WaterfillBalance(StrictModel):
    """Max-min fair quotas over the values of a label to a target size (docs/algorithms.md section 5)."""

    method: Literal["waterfill"]
    by: str
    size: int | None = Field(default=None, ge=0)  # expected labeled rows kept
    retention: float | None = Field(default=None, gt=0.0, le=1.0)  # or: this share of labeled rows
    unlabeled: Literal["keep", "drop"] = "keep"
    # over a cluster with levels: water-fill the top level, then each cluster's quota over its
    # children, down to the leaves (balanced sampling of Vo et al.)
    hierarchical: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> "WaterfillBalance":
        if (self.size is None) == (self.retention is None):
            raise ValueError("waterfill needs exactly one of balance.size and balance.retention")
        return self


class RnbBalance(StrictModel):
    """R&B Balance (docs/algorithms.md section 2): domains are the values of a label or cluster ``by``.

    A short proxy run on the sample's frozen embeddings (a linear image-to-text projection trained
    with the CLIP loss) gives per-domain final-layer gradients each round; the mixture becomes
    ``p = softmax(lam * G p_eval / ||G p_eval||)``. Rows get weight ``p_d / (n_d / n)``.
    """

    method: Literal["rnb"]
    by: str
    lam: float = Field(default=3.0, gt=0.0)  # softmax temperature of the update
    rounds: int = Field(default=5, gt=0)
    steps_per_round: int = Field(default=40, gt=0)
    batch_size: int = Field(default=256, gt=1)
    lr: float = Field(default=1.0, gt=0.0)  # SGD step on the projection
    logit_scale: float = Field(default=20.0, gt=0.0)  # fixed 1/temperature of the contrastive loss
    init: Literal["uniform", "natural"] = "uniform"  # p before the first round
    # p_eval over the domains (missing ones get 0); default uniform, or from an evaluation sample
    eval_shares: dict[str, float] | None = None
    # or an evaluation shard directory (same embedding columns as the input): its rows are
    # assigned to the nearest training domain, never clustered separately
    eval_path: str | None = None
    min_sample_rows: int = Field(default=2, gt=0)  # domains with fewer sample rows keep weight 1
    # largest row weight (expected copies): domain weights above it are clipped and the others
    # scaled up so the balanced domains keep their rows' expected total; None: no cap
    max_weight: float | None = Field(default=None, ge=1.0)
    unlabeled: Literal["keep", "drop"] = "keep"  # rows without a value: weight 1, or dropped
    gradient_dim: int = Field(default=65536, gt=0)  # larger gradients are sketched to this size
    seed: int = 0

    @field_validator("eval_shares")
    @classmethod
    def _eval(cls, shares: dict[str, float] | None) -> dict[str, float] | None:
        if shares is not None and (any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0):
            raise ValueError("eval_shares must be non-negative with a positive sum")
        return shares


BalanceSpec = Annotated[
    Union[NoBalance, CapBalance, M4Balance, ReweighBalance, RakeBalance, WaterfillBalance, RnbBalance],
    Field(discriminator="method"),
]


def balance_methods() -> set[str]:
    members = BalanceSpec.__origin__.__args__  # the classes inside Annotated[Union[...]]
    return {m.model_fields["method"].annotation.__args__[0] for m in members}
