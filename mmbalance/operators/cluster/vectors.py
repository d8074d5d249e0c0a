"""Which embedding is clustered: one column, or the normalised mean of image and text, as (n, d)
unit-norm float32 rows without per-row Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from mmbalance.operators.arrays import embedding_matrix, unit_rows

EmbeddingSource = Literal["image", "text", "mean"]


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which embedding is clustered: one column, or the normalised mean of image and text."""

    source: EmbeddingSource = "image"
    image_column: str | None = None
    text_column: str | None = None

    def __post_init__(self) -> None:
        needed = {"image": ["image_column"], "text": ["text_column"], "mean": ["image_column", "text_column"]}
        if self.source not in needed:
            raise ValueError(f"embedding source must be image, text or mean, got {self.source!r}")
        missing = [name for name in needed[self.source] if not getattr(self, name)]
        if missing:
            raise ValueError(f"embedding source '{self.source}' needs {' and '.join(missing)}")

    @property
    def columns(self) -> list[str]:
        cols = {"image": [self.image_column], "text": [self.text_column]}
        return cols.get(self.source, [self.image_column, self.text_column])  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def extract(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) unit-norm float32 matrix and a mask of usable rows (null, NaN/inf or zero rows are
        not usable and hold zeros)."""
        if self.source == "mean":
            a, va = unit_rows(*embedding_matrix(table.column(self.image_column)))
            b, vb = unit_rows(*embedding_matrix(table.column(self.text_column)))
            if a.shape[1] != b.shape[1]:
                raise ValueError(f"image ({a.shape[1]}) and text ({b.shape[1]}) embeddings differ in dimension")
            a += b
            return unit_rows(a, va & vb)
        return unit_rows(*embedding_matrix(table.column(self.columns[0])))


def as_unit(data: np.ndarray | pa.Table, embedding: EmbeddingSpec | None) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, pa.Table):
        if embedding is None:
            raise ValueError("an Arrow table needs an EmbeddingSpec to say which column to use")
        return embedding.extract(data)
    return unit_rows(data)
