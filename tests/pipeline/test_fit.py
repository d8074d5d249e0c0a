"""The fit stage's readers (pipeline/fit.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from corpora import write_with_flipped_byte

from mmbalance.operators.arrays import fixed_size_list, unit_rows
from mmbalance.pipeline.fit import fit_models, read_eval_sample
from mmbalance.pipeline.rows import SAMPLE_IMAGE
from mmbalance.io.store import RunStore
from mmbalance.schemas.contract import InputError
from mmbalance.schemas.recipe import parse_recipe


def _recipe(verify: bool):
    return parse_recipe({"input": {"columns": {"image_embedding": "emb"}}, "sample": {"size": 100},
                         "execution": {"verify_checksums": verify}})


def test_eval_sample_verifies_page_checksums_on_request(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8)})
    (tmp_path / "eval").mkdir()
    write_with_flipped_byte(tmp_path / "eval" / "part-0.parquet", table, "emb")
    # off: the flipped value is read as it is, every row kept
    assert read_eval_sample(str(tmp_path / "eval"), _recipe(False), {"emb": 8}).num_rows == 40
    with pytest.raises(InputError, match=r"^eval:part-0.parquet: unreadable data .*CRC"):
        read_eval_sample(str(tmp_path / "eval"), _recipe(True), {"emb": 8})


@pytest.mark.parametrize("swaps", [None, 0])
def test_cluster_fit_uses_every_sampled_row_and_the_recipes_swaps(tmp_path, swaps):
    x = unit_rows(np.random.default_rng(1).normal(size=(1500, 12)))[0]
    sample = pa.table({SAMPLE_IMAGE: fixed_size_list(x.astype(np.float16))})
    recipe = parse_recipe({"input": {"columns": {"image_embedding": "emb"}}, "sample": {"size": 1500},
                           "clusters": [{"name": "concept", "k": 10, "swaps": swaps}]})
    _, info = fit_models(recipe, RunStore(str(tmp_path)), sample, [], {}, len(x))
    meta = info["concept"]
    assert meta["n_trained"] == len(x)  # faiss trains on the whole sample, not 256 rows per centroid
    if swaps == 0:
        assert meta["swaps"] == 0 and meta["swap"] is None
    else:  # default: split-and-merge trials ran, and are recorded with the model
        assert meta["swaps"] >= 8 and meta["swap"]["tried"] >= 1
