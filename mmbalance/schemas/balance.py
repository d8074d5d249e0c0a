"""Balance steps of the recipe: one pydantic model per ``balance.method``.

A new method adds its model here, to ``BalanceSpec``, and registers a solver in
``mmbalance.operators.solve`` under the same name.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


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


BalanceSpec = Annotated[Union[NoBalance, CapBalance], Field(discriminator="method")]


def balance_methods() -> set[str]:
    members = BalanceSpec.__origin__.__args__  # the classes inside Annotated[Union[...]]
    return {m.model_fields["method"].annotation.__args__[0] for m in members}
