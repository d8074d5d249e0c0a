"""The fit stage's readers (pipeline/fit.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from corpora import write_with_flipped_byte

from mmbalance.pipeline.fit import read_eval_sample
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
