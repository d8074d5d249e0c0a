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


def test_the_two_pass_sample_merge_is_the_bottom_k_of_all_candidates(tmp_path):
    """merge_sample reads only keys first, then each shard's chosen rows: the result equals the
    bottom-k by (priority, shard, row) of every candidate held at once, duplicates excluded, ties in
    priority across shards included; an empty pick keeps the columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from mmbalance.io.store import RunStore
    from mmbalance.pipeline.fit import merge_sample
    from mmbalance.pipeline.shards import Shard
    from mmbalance.pipeline.stages.scan import write_sample

    rng = np.random.default_rng(7)
    store = RunStore(str(tmp_path / "run"))
    shards, everything = [], []
    for i in range(5):
        n = int(rng.integers(0, 40))
        rows = np.sort(rng.choice(1000, n, replace=False)).astype(np.int64)
        part = pa.table({"row": rows, "uid": [f"s{i}-{r}" for r in rows],
                         "priority": pa.array(rng.integers(0, 50, n), pa.uint64()),  # ties across shards
                         "image_emb": pa.array(rng.standard_normal((n, 4)).astype(np.float16).tolist(), pa.list_(pa.float16(), 4))})
        shard = Shard(index=i, relpath=f"p{i}.parquet", path=f"p{i}.parquet", size=1, shard_id=f"p{i}")
        shards.append(shard)
        if i == 3:
            continue  # a shard without a sample file
        write_sample(store, shard.shard_id, part)
        everything.append(part)
    dups = {0: {"rows": everything[0].column("row").to_pylist()[:3]}, 2: {"rows": everything[2].column("row").to_pylist()[-2:]}}
    expected_parts = []
    for i, part in zip([0, 1, 2, 4], everything):
        keep = pc.invert(pc.is_in(part.column("row"), value_set=pa.array(dups.get(i, {}).get("rows", []), pa.int64())))
        kept = part.filter(keep)
        expected_parts.append(kept.append_column("shard_index", pa.array(np.full(kept.num_rows, i, np.int64))))
    every = pa.concat_tables(expected_parts)
    order = pc.sort_indices(every, sort_keys=[("priority", "ascending"), ("shard_index", "ascending"), ("row", "ascending")])
    for size in (1, 17, every.num_rows, every.num_rows + 10):
        got = merge_sample(store, shards, dups, size)
        want = every.take(order.slice(0, size))
        assert got.column_names == want.column_names
        assert got.to_pydict() == pa.Table.from_arrays(list(want.columns), names=want.column_names).cast(got.schema).to_pydict()
    assert merge_sample(store, shards, dups, 0).num_rows == 0 and "image_emb" in merge_sample(store, shards, dups, 0).column_names
    assert merge_sample(store, shards[3:4], {}, 10) is None
