"""The scan stage's own helpers (its outputs are checked end to end in test_rebalance and test_resume)."""

from __future__ import annotations

from mmbalance.pipeline.stages.scan import heavy_columns
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import DEMO_RECIPE


def _recipe(columns: dict, labels: list) -> object:
    return parse_recipe({**DEMO_RECIPE, "input": {"columns": {**DEMO_RECIPE["input"]["columns"], **columns}},
                         "labels": labels, "clusters": [], "balance": {"method": "cap", "by": "occupation", "cap": 5}})


def test_taggers_get_rows_without_embeddings_and_images_but_with_every_column_they_read():
    caption_label = [{"name": "occupation", "source": "caption", "caption": {"vocabulary": "occupation"}}]
    assert heavy_columns(_recipe({"image": "jpg"}, caption_label)) == ["image_emb", "text_emb", "jpg"]
    # a label read from a column that is also mapped as the image (odd, but legal) keeps that column
    odd = [*caption_label, {"name": "kind", "source": "column", "column": "jpg"}]
    assert heavy_columns(_recipe({"image": "jpg"}, odd)) == ["image_emb", "text_emb"]
