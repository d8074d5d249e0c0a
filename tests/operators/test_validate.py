import numpy as np
import pyarrow as pa
import pytest
from corpora import held_out_table

from mmbalance.operators.validate import embedding_problems, validate_rows
from mmbalance.schemas.recipe import parse_recipe

DIM = 16


def _reasons(table, recipe, dims=None):
    result = validate_rows(table, recipe, dims or {"image_emb": DIM, "text_emb": DIM}, "s.parquet", 100)
    return result, dict(zip(result.rejects.column("row").to_pylist(), result.rejects.column("reason").to_pylist()))


def test_clean_rows_pass(issue_recipe):
    result, reasons = _reasons(held_out_table(50, 1, dim=DIM), issue_recipe)
    assert result.valid.all() and reasons == {}


def test_each_problem_gets_a_reason_naming_the_column(issue_recipe):
    t = held_out_table(8, 1, dim=DIM)
    uid = t.column("uid").to_pylist()
    uid[0] = None
    uid[7] = ""
    img = [list(v) for v in t.column("image_emb").to_pylist()]
    img[1][3] = float("nan")
    img[2] = img[2][:-1]  # wrong dimension
    img[3] = None
    txt = [list(v) for v in t.column("text_emb").to_pylist()]
    txt[4][0] = float("inf")
    gender = t.column("gender").to_pylist()
    gender[5] = "female"
    t = (
        t.set_column(0, "uid", pa.array(uid, pa.string()))
        .set_column(2, "image_emb", pa.array(img, pa.list_(pa.float32())))
        .set_column(3, "text_emb", pa.array(txt, pa.list_(pa.float32())))
        .set_column(4, "gender", pa.array(gender, pa.string()))
    )
    result, reasons = _reasons(t, issue_recipe)
    assert result.valid.tolist() == [False, False, False, False, False, False, True, False]
    assert reasons[100] == "null uid (column 'uid')"
    assert "NaN or inf" in reasons[101] and "image_emb" in reasons[101]
    assert reasons[102] == f"image_embedding 'image_emb' has {DIM - 1} values, expected {DIM}"
    assert reasons[103] == "missing image_embedding (column 'image_emb' is null)"
    assert "text_embedding" in reasons[104] and "NaN or inf" in reasons[104]
    assert reasons[105] == "attribute gender: value 'female' (column 'gender') not in ['woman', 'man']"
    assert reasons[107] == "empty uid (column 'uid')"
    assert set(result.rejects.column("shard").to_pylist()) == {"s.parquet"}
    assert result.rejects.column("uid").to_pylist()[0] is None


def test_fixed_size_float16_nan_and_inf_are_found():
    m = np.ones((5, 4), np.float16)
    m[1, 2] = np.nan
    m[3, 0] = -np.inf
    arr = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), 4)
    found = embedding_problems(arr, 4)
    assert found.nonfinite.tolist() == [False, True, False, True, False] and not found.wrong_dim.any() and not found.is_null.any()
    # a slice keeps its own rows (offset handling)
    assert embedding_problems(arr.slice(2, 3), 4).nonfinite.tolist() == [False, True, False]
    assert embedding_problems(arr, 8).wrong_dim.all()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a NaN payload is data to reject, not a warning to print
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fixed_rows_problems_agree_with_numpy_on_every_float16_value(dtype):
    """Every float16 bit pattern (NaN payloads, infinities, subnormals, both zeros) alone in a row,
    and beside a finite value and a zero, against numpy's isfinite and == 0 in float64."""
    from mmbalance.operators.validate import fixed_rows_problems

    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    for other in (None, np.float16(0.5), np.float16(-0.0)):
        column = every[:, None] if other is None else np.stack([every, np.full_like(every, other)], axis=1)
        matrix = column.astype(dtype)
        nonfinite, zero = fixed_rows_problems(matrix)
        with np.errstate(invalid="ignore"):
            wide = matrix.astype(np.float64)
        assert np.array_equal(nonfinite, ~np.isfinite(wide).all(axis=1))
        assert np.array_equal(zero, (wide == 0).all(axis=1))


def test_status_and_utility_checks():
    recipe = parse_recipe({"input": {"columns": {"uid": "key", "status": "status", "utility": "score"}}})
    t = pa.table({
        "key": ["a", "b", "c", "d"],
        "status": ["success", "failed_to_download", None, "success"],
        "score": [0.3, 0.1, 0.2, -1.0],
    })
    result, reasons = _reasons(t, recipe, {})
    assert result.valid.tolist() == [True, False, False, False]
    assert reasons[101] == "status 'failed_to_download' is not 'success' (column 'status')"
    assert reasons[102] == "status 'None' is not 'success' (column 'status')"
    assert reasons[103] == "utility (column 'score') is negative"


@pytest.mark.parametrize("fixed", [True, False])
def test_embedding_problems_null_rows(fixed):
    if fixed:
        arr = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8, np.float32)), 4, mask=pa.array([False, True]))
    else:
        arr = pa.array([[0.0] * 4, None], pa.list_(pa.float32()))
    found = embedding_problems(arr, 4)
    assert found.is_null.tolist() == [False, True] and not found.wrong_dim.any() and not found.nonfinite.any()
    assert found.all_zero.tolist() == [True, False]


@pytest.mark.parametrize("fixed", [True, False])
def test_all_zero_rows_either_sign_with_slices_nulls_and_other_lengths(fixed):
    rows = [[0.0, 0.0, 0.0], [0.0, 1e-4, 0.0], None, [-0.0, 0.0, -0.0], [0.0, 0.0, 0.0]]
    if fixed:
        flat = np.array([v if v is not None else [0.0] * 3 for v in rows], np.float16).reshape(-1)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat), 3, mask=pa.array([v is None for v in rows]))
        expected = [True, False, False, True, True]
    else:
        rows += [[0.0, 0.0], [0.0] * 4, [2.0, 0.0, 0.0]]  # other lengths: a dimension problem, not this one
        arr = pa.array(rows, pa.list_(pa.float32()))
        expected = [True, False, False, True, True, False, False, False]
    assert embedding_problems(arr, 3).all_zero.tolist() == expected
    assert embedding_problems(arr.slice(1), 3).all_zero.tolist() == expected[1:]
    result = validate_rows(pa.table({"uid": [str(i) for i in range(len(rows))], "e": arr}),
                           parse_recipe({"input": {"columns": {"image_embedding": "e"}}}), {"e": 3})
    zero = [r for r in result.rejects.column("reason").to_pylist() if r.startswith("all-zero")]
    assert len(zero) == sum(expected) and result.reason_counts["all-zero image_embedding"] == sum(expected)
