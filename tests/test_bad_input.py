"""Bad input, table-driven: every case ends in a one-line error (exit 2, naming file/row/column) or in
rejected rows, and the accounting ``input rows = manifest rows + rejected rows`` holds exactly.

The command line runs in-process (typer's CliRunner) with the local executor: the same code path as
``mmbalance rebalance ... --executor local``, without a Python start-up per case; the few cases whose
error is raised on a Ray worker run the CLI as a subprocess on an embedded Ray (loopback only). Cases
whose expectation the code does not meet yet are kept and marked ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import json

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, write_shards
from typer.testing import CliRunner

from mmbalance.cli import app
from mmbalance.jobs.local_cluster import cluster_env

CAP_BLOCK = """balance:
  method: cap               # MetaCLIP-style per-value cap; other methods come in other issues
  by: occupation
  cap: 1000"""
assert CAP_BLOCK in RECIPE_FROM_ISSUE


def recipe_with(old: str, new: str, base: str = RECIPE_FROM_ISSUE) -> str:
    assert old in base, old
    return base.replace(old, new)


# -- building blocks ------------------------------------------------------------------------------


def t(rows: int = 100, seed: int = 1, **kw) -> pa.Table:
    return held_out_table(rows, seed, **kw)


def with_values(table: pa.Table, column: str, changes: dict[int, object], typ: pa.DataType | None = None) -> pa.Table:
    values = table.column(column).to_pylist()
    for i, v in changes.items():
        values[i] = v
    idx = table.schema.get_field_index(column)
    return table.set_column(idx, column, pa.array(values, typ or table.schema.field(column).type))


def with_invalid_utf8(table: pa.Table, column: str, row: int) -> pa.Table:
    """Put bytes that are not UTF-8 into a string column (pyarrow neither checks on write nor on read)."""
    arr = table.column(column).combine_chunks()
    validity, offsets, data = arr.buffers()
    start = int(np.frombuffer(offsets, np.int32)[arr.offset + row])
    raw = bytearray(data.to_pybytes())
    raw[start : start + 2] = b"\xff\xfe"
    bad = pa.Array.from_buffers(pa.string(), len(arr), [validity, offsets, pa.py_buffer(bytes(raw))], offset=arr.offset)
    return table.set_column(table.schema.get_field_index(column), column, bad)


# -- the cases ------------------------------------------------------------------------------------


@dataclass
class Error:
    """Exit 2 and one line on stderr containing every string in ``names``."""

    names: tuple[str, ...]


@dataclass
class Rejects:
    """Exit 0; ``input`` rows read; rejected rows per reason (substring of the reason -> count)."""

    input: int
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Case:
    name: str
    build: Callable[[Path], tuple[Path, str]]  # tmp dir -> (corpus, recipe text)
    expect: Error | Rejects
    xfail: str | None = None
    executor: str = "local"  # "ray" where the error is raised on a worker


def corpus(tables: dict[str, pa.Table], recipe: str = RECIPE_FROM_ISSUE):
    def build(tmp: Path) -> tuple[Path, str]:
        return write_shards(tmp / "corpus", tables), recipe

    return build


def _corrupt(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t()})
    (c / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    return c, RECIPE_FROM_ISSUE


def _truncated_footer(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t(), "b.parquet": t(seed=2)})
    data = (c / "b.parquet").read_bytes()
    (c / "b.parquet").write_bytes(data[:-9])  # footer length and magic gone: a copy cut short
    return c, RECIPE_FROM_ISSUE


def _truncated_body(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t(), "b.parquet": t(seed=2)})
    data = (c / "b.parquet").read_bytes()
    (c / "b.parquet").write_bytes(data[: len(data) // 2])
    return c, RECIPE_FROM_ISSUE


def _zero_byte_file(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t()})
    (c / "b.parquet").write_bytes(b"")
    return c, RECIPE_FROM_ISSUE


def _corrupt_data_page(tmp: Path):
    """A valid footer over a damaged column chunk: found only when the scan reads it (in a worker)."""
    c = write_shards(tmp / "corpus", {"a.parquet": t(3000), "b.parquet": t(3000, seed=2)})
    path = c / "b.parquet"
    offset = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return c, RECIPE_FROM_ISSUE


def _empty_dir(tmp: Path):
    (tmp / "corpus").mkdir()
    return tmp / "corpus", RECIPE_FROM_ISSUE


def _only_other_files(tmp: Path):
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "a.csv").write_text("uid,caption\n1,x\n")
    (tmp / "corpus" / "_SUCCESS").write_text("")
    return tmp / "corpus", RECIPE_FROM_ISSUE


def _missing_input(tmp: Path):
    return tmp / "no-such-dir", RECIPE_FROM_ISSUE


def _symlink_loop(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t()})
    os.symlink(".", c / "loop")  # corpus/loop/loop/loop/... -> the same directory
    return c, RECIPE_FROM_ISSUE


def _self_symlink(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t()})
    os.symlink("x.parquet", c / "x.parquet")  # a shard name that can never be opened
    return c, RECIPE_FROM_ISSUE


def _duplicate_shard_files(tmp: Path):
    c = write_shards(tmp / "corpus", {"a.parquet": t(), "b.parquet": t(seed=2)})
    (c / "copy").mkdir()
    shutil.copy(c / "a.parquet", c / "copy" / "a.parquet")  # the same file twice, e.g. a re-run sync
    return c, RECIPE_FROM_ISSUE


def _giant_caption(tmp: Path):
    return write_shards(tmp / "corpus", {"a.parquet": with_values(t(), "caption", {3: "x" * (8 << 20)})}), RECIPE_FROM_ISSUE


INFEASIBLE = recipe_with(CAP_BLOCK, """balance:
  method: m4
  targets: {gender: {woman: 0.5, man: 0.5}}
  associate: [[gender, occupation]]
  tolerance: {representation: 0.0, association: 0.0}
  retention: 0.99""")

STATUS = recipe_with("text_embedding: text_emb}", "text_embedding: text_emb, status: status}")
UTILITY = recipe_with("text_embedding: text_emb}", "text_embedding: text_emb, utility: clip_score}")


def _with_status(tmp: Path):
    table = t()
    status = ["success"] * 100
    status[2], status[50] = "failed_to_download", None
    return write_shards(tmp / "corpus", {"a.parquet": table.append_column("status", pa.array(status))}), STATUS


def _with_utility(tmp: Path):
    table = t()
    score = np.linspace(0.1, 0.4, 100)
    score[7], score[8] = -0.5, np.nan
    return write_shards(tmp / "corpus", {"a.parquet": table.append_column("clip_score", pa.array(score))}), UTILITY


def _benign_drift(tmp: Path):
    b = t(seed=2)
    b = b.select(["occupation", "gender", "uid", "text_emb", "image_emb", "caption"]).append_column("extra", pa.array(range(100)))
    return write_shards(tmp / "corpus", {"a.parquet": t(), "b.parquet": b}), RECIPE_FROM_ISSUE


def _float_types_mixed(tmp: Path):
    return write_shards(tmp / "corpus", {"a.parquet": t(), "b.parquet": t(seed=2, fixed_size=True)}), RECIPE_FROM_ISSUE


def _all_shards_empty(tmp: Path):
    return write_shards(tmp / "corpus", {"a.parquet": t(0), "b.parquet": t(0, seed=2)}), RECIPE_FROM_ISSUE


def _emb(values: list) -> pa.Array:
    return pa.array(values, pa.list_(pa.float32()))


def _bad_embeddings(tmp: Path):
    table = t()
    emb = table.column("image_emb").to_pylist()
    emb[4][0], emb[5][3] = float("nan"), float("inf")
    emb[6] = emb[6][:15]  # one value short
    emb[7] = None
    txt = table.column("text_emb").to_pylist()
    txt[8] = txt[8] + [0.0]  # one value too many
    table = table.set_column(2, "image_emb", _emb(emb)).set_column(3, "text_emb", _emb(txt))
    return write_shards(tmp / "corpus", {"a.parquet": table}), RECIPE_FROM_ISSUE


def _dup_within(tmp: Path):
    a = t()
    return write_shards(tmp / "corpus", {"a.parquet": with_values(a, "uid", {10: a.column("uid")[3].as_py(), 11: a.column("uid")[3].as_py()})}), RECIPE_FROM_ISSUE


def _dup_across(tmp: Path):
    a, b = t(), t(seed=2)
    return write_shards(tmp / "corpus", {"a.parquet": a, "b.parquet": with_values(b, "uid", {0: a.column("uid")[99].as_py()})}), RECIPE_FROM_ISSUE


def _short_first_row(tmp: Path):
    """The first row of the first shard is one value short: it must not set the corpus dimension."""
    table = t(4000)
    emb = table.column("image_emb").to_pylist()
    emb[0] = emb[0][:15]
    return write_shards(tmp / "corpus", {"a.parquet": table.set_column(2, "image_emb", _emb(emb))}), RECIPE_FROM_ISSUE


def _no_majority_length(tmp: Path):
    table = t(100)
    emb = table.column("image_emb").to_pylist()
    emb = [v[:15] if i % 3 == 0 else (v + [0.5] if i % 3 == 1 else v) for i, v in enumerate(emb)]
    return write_shards(tmp / "corpus", {"a.parquet": table.set_column(2, "image_emb", _emb(emb))}), RECIPE_FROM_ISSUE


def _zero_vectors(tmp: Path):
    table = t()
    img, txt = table.column("image_emb").to_pylist(), table.column("text_emb").to_pylist()
    img[3], img[40] = [0.0] * 16, [-0.0] * 16
    txt[41] = [0.0] * 16
    txt[3] = [0.0] * 16  # the same row: rejected once, for its first problem
    return write_shards(tmp / "corpus", {"a.parquet": table.set_column(2, "image_emb", _emb(img)).set_column(3, "text_emb", _emb(txt))}), RECIPE_FROM_ISSUE


def _zero_vectors_fixed_size(tmp: Path):
    table = t(fixed_size=True)
    m = np.asarray(table.column("image_emb").combine_chunks().values.to_numpy()).reshape(100, 16).copy()
    m[[5, 6]] = 0
    arr = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), 16)
    return write_shards(tmp / "corpus", {"a.parquet": table.set_column(2, "image_emb", arr)}), RECIPE_FROM_ISSUE


VALUE_WORDS = recipe_with("values: [woman, man]", "values: [yes, no]")


def _boolean_words_as_values(tmp: Path):
    gender = [{"woman": "yes", "man": "no"}.get(v) for v in t().column("gender").to_pylist()]
    return write_shards(tmp / "corpus", {"a.parquet": t().set_column(4, "gender", pa.array(gender, pa.string()))}), VALUE_WORDS


def _flipped_byte(verify: bool):
    """A byte of a caption flipped inside a data page of a shard written with page CRCs
    (uncompressed, so the flip leaves a readable but wrong value)."""

    def build(tmp: Path):
        c = write_shards(tmp / "corpus", {"a.parquet": t()})
        path = c / "b.parquet"
        pq.write_table(t(seed=2), path, compression="none", use_dictionary=False, write_page_checksum=True)
        chunk = pq.read_metadata(path).row_group(0).column(t().schema.get_field_index("caption"))
        data = bytearray(path.read_bytes())
        last = chunk.data_page_offset + chunk.total_compressed_size - 1  # the last caption's last letter
        before = pq.read_table(path).column("caption")[-1].as_py()
        data[last] ^= 0x01
        path.write_bytes(bytes(data))
        assert pq.read_table(path).column("caption")[-1].as_py() != before  # read back wrong, without an error
        verify_line = {True: "\nexecution: {verify_checksums: true}\n", False: "\nexecution: {verify_checksums: false}\n",
                       None: "\n"}[verify]  # None: the default, on
        return c, RECIPE_FROM_ISSUE + verify_line

    return build


EXPORT_CSV = recipe_with("formats: [parquet]", "formats: [parquet, csv]")

CASES = [
    # unreadable files: stop before any work, naming the file
    Case("corrupt_parquet", _corrupt, Error(("bad.parquet", "unreadable Parquet"))),
    Case("truncated_footer", _truncated_footer, Error(("b.parquet", "unreadable Parquet"))),
    Case("truncated_body", _truncated_body, Error(("b.parquet", "unreadable Parquet"))),
    Case("corrupt_data_page", _corrupt_data_page, Error(("b.parquet", "unreadable data"))),
    Case("corrupt_data_page_on_ray", _corrupt_data_page, Error(("b.parquet", "unreadable data")), executor="ray"),
    Case("zero_byte_file", _zero_byte_file, Error(("b.parquet", "unreadable Parquet", "0 bytes"))),
    Case("empty_directory", _empty_dir, Error(("corpus", "no Parquet files"))),
    Case("only_non_parquet_files", _only_other_files, Error(("corpus", "no Parquet files"))),
    Case("missing_input_path", _missing_input, Error(("no-such-dir", "does not exist"))),
    Case("symlink_loop", _symlink_loop, Error(("loop", "symlink"))),
    Case("self_symlink_shard", _self_symlink, Error(("x.parquet",))),
    # schemas: every shard is checked before work starts
    Case("missing_required_column", corpus({"a.parquet": t().drop_columns(["uid"])}), Error(("a.parquet", "missing column 'uid'"))),
    Case("wrong_column_type", corpus({"a.parquet": t().set_column(0, "uid", pa.array(np.arange(100.0)))}),
         Error(("a.parquet", "column 'uid'", "double"))),
    Case("embedding_of_integers", corpus({"a.parquet": t().set_column(2, "image_emb", pa.array([[1, 2]] * 100, pa.list_(pa.int64())))}),
         Error(("a.parquet", "column 'image_emb'", "float16/float32"))),
    Case("schema_drift_renamed_column", corpus({"a.parquet": t(), "b.parquet": t(seed=2).rename_columns(
        ["uid", "caption", "image_emb", "text_emb", "sex", "occupation"])}), Error(("b.parquet", "missing column 'gender'"))),
    Case("schema_drift_type_change", corpus({"a.parquet": t(), "b.parquet": t(seed=2).set_column(
        5, "occupation", pa.array([["x"]] * 100))}), Error(("b.parquet", "column 'occupation'", "list"))),
    Case("mixed_embedding_dims_fixed_size", corpus({"a.parquet": t(dim=16, fixed_size=True), "b.parquet": t(seed=2, dim=32, fixed_size=True)}),
         Error(("b.parquet", "'image_emb'", "dimension 32", "a.parquet has 16"))),
    # the recipe
    Case("recipe_typo", corpus({"a.parquet": t()}, recipe_with("cap: 1000", "cpa: 1000")),
         Error(("r.yaml", "unknown key 'balance.cpa'", "did you mean 'cap'"))),
    # one close-match mechanism for every key, required or optional, in any section
    Case("recipe_typo_optional_key", corpus({"a.parquet": t()}, recipe_with("tolerance:", "tolerence:", INFEASIBLE)),
         Error(("r.yaml", "unknown key 'balance.tolerence'", "did you mean 'tolerance'"))),
    Case("recipe_typo_section", corpus({"a.parquet": t()}, recipe_with("balance:", "clustres: [{name: c, k: 3}]\nbalance:")),
         Error(("r.yaml", "unknown key 'clustres'", "did you mean 'clusters'"))),
    Case("recipe_invalid_yaml", corpus({"a.parquet": t()}, recipe_with("cap: 1000", "cap: [1000")), Error(("r.yaml", "invalid YAML"))),
    Case("recipe_negative_cap", corpus({"a.parquet": t()}, recipe_with("cap: 1000", "cap: -5")), Error(("r.yaml", "balance", "cap"))),
    Case("recipe_names_missing_column", corpus({"a.parquet": t()}, recipe_with("caption: caption", "caption: text")),
         Error(("a.parquet", "missing column 'text'"))),
    Case("recipe_balances_unknown_label", corpus({"a.parquet": t()}, recipe_with("by: occupation", "by: ocupation")),
         Error(("r.yaml", "ocupation"))),
    # more clusters than the corpus has rows, sample.size already above it: say so, not "raise sample.size"
    Case("k_above_the_corpus", corpus({"a.parquet": t()}, recipe_with("balance:", "clusters: [{name: c, k: 500}]\nbalance:")),
         Error(("clusters c: k=500", "the corpus has only 100 usable rows", "lower k"))),
    Case("infeasible_targets", corpus({"a.parquet": t(2000)}, INFEASIBLE), Error(("balance.retention", "infeasible", "largest feasible"))),
    # rows rejected with a reason; everything else goes on
    Case("null_uid", corpus({"a.parquet": with_values(t(), "uid", {0: None, 99: None})}), Rejects(100, {"null uid": 2})),
    Case("empty_uid", corpus({"a.parquet": with_values(t(), "uid", {5: ""})}), Rejects(100, {"empty uid": 1})),
    Case("duplicate_uid_within_shard", _dup_within, Rejects(100, {"duplicate uid: first seen in a.parquet row 3": 2})),
    Case("duplicate_uid_across_shards", _dup_across, Rejects(200, {"duplicate uid: first seen in a.parquet row 99": 1})),
    Case("duplicate_shard_files", _duplicate_shard_files, Rejects(300, {"duplicate uid: first seen in a.parquet": 100})),
    Case("nan_inf_short_long_null_embeddings", _bad_embeddings,
         Rejects(100, {"NaN or inf": 2, "has 15 values, expected 16": 1, "has 17 values, expected 16": 1, "missing image_embedding": 1})),
    Case("mixed_embedding_dims_variable_lists", corpus({"a.parquet": t(dim=16), "b.parquet": t(seed=2, dim=32)}),
         Rejects(200, {"has 32 values, expected 16": 100})),
    Case("attribute_value_not_in_values", corpus({"a.parquet": with_values(t(), "gender", {5: "nonbinary", 6: "W"})}),
         Rejects(100, {"'nonbinary'": 1, "'W'": 1})),
    Case("img2dataset_status", _with_status, Rejects(100, {"'failed_to_download' is not 'success'": 1, "'None' is not 'success'": 1})),
    Case("utility_negative_or_nan", _with_utility, Rejects(100, {"is negative": 1, "is null, NaN or inf": 1})),
    Case("zero_rows_after_filtering", corpus({"a.parquet": with_values(t(), "gender", {i: "x" for i in range(100)})}),
         Rejects(100, {"attribute gender": 100})),
    Case("one_shard_of_zero_rows", corpus({"a.parquet": t(), "sub/empty.parquet": t(0, seed=9)}), Rejects(100)),
    # no row anywhere: nothing to take the embedding dimension from (input.embedding_dim would allow an empty run)
    Case("all_shards_zero_rows", _all_shards_empty, Error(("'image_emb'", "cannot tell the embedding dimension"))),
    Case("giant_caption", _giant_caption, Rejects(100)),  # 8 MiB caption: accepted, not read into any sidecar
    Case("benign_drift_reordered_extra_columns", _benign_drift, Rejects(200)),
    Case("float32_lists_and_float16_fixed_size", _float_types_mixed, Rejects(200)),
    Case("non_utf8_uid", corpus({"a.parquet": with_invalid_utf8(t(), "uid", 4)}), Rejects(100, {"UTF-8": 1})),
    Case("non_utf8_caption", corpus({"a.parquet": with_invalid_utf8(t(), "caption", 4)}), Rejects(100, {"UTF-8": 1})),
    # the dimension comes from input.embedding_dim, a fixed_size_list type, or most of the first shard's rows
    Case("short_first_embedding_row", _short_first_row, Rejects(4000, {"has 15 values, expected 16": 1})),
    Case("no_majority_embedding_length", _no_majority_length,
         Error(("a.parquet", "'image_emb'", "no majority embedding length", "input.embedding_dim"))),
    Case("all_zero_embeddings", _zero_vectors, Rejects(100, {"all-zero image_embedding": 2, "all-zero text_embedding": 1})),
    Case("all_zero_embeddings_fixed_size", _zero_vectors_fixed_size, Rejects(100, {"all-zero image_embedding": 2})),
    # recipe faults found before any work
    Case("recipe_duplicate_key", corpus({"a.parquet": t()}, recipe_with("cap: 1000", "cap: 1000\n  cap: 5")),
         Error(("r.yaml", "line 12 duplicate key 'cap' (first given on line 11)",))),
    Case("recipe_boolean_words_as_value_names", _boolean_words_as_values, Rejects(100)),
    Case("export_csv_without_images", corpus({"a.parquet": t()}, EXPORT_CSV), Error(("export.formats", "csv", "image"))),
    # page checksums: verified by default (execution.verify_checksums); turned off, the flip goes unseen
    Case("flipped_byte_checksum_verified", _flipped_byte(True), Error(("b.parquet", "unreadable data", "CRC"))),
    Case("flipped_byte_checksum_verified_by_default", _flipped_byte(None), Error(("b.parquet", "unreadable data", "CRC"))),
    Case("flipped_byte_not_verified", _flipped_byte(False), Rejects(200)),
]


@dataclass
class Outcome:
    exit_code: int
    stderr: str
    detail: object = None
    warnings: list[str] = field(default_factory=list)  # Python warnings the run raised (a user would see them)


# the warning categories Python does not print by default (outside __main__)
HIDDEN_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _run(tmp: Path, case: Case) -> tuple[Outcome, Path]:
    source, recipe_text = case.build(tmp)
    recipe = tmp / "r.yaml"
    recipe.write_text(recipe_text)
    out = tmp / "out"
    args = ["rebalance", str(source), "--out", str(out), "--recipe", str(recipe), "--executor", case.executor, "-q"]
    if case.executor == "ray":
        # a subprocess: Ray reads its loopback setting when it is first imported (see cluster_env)
        res = subprocess.run([sys.executable, "-m", "mmbalance.cli", *args, "--num-cpus", "1"], env=cluster_env(),
                             capture_output=True, text=True, timeout=100)
        return Outcome(res.returncode, res.stderr), out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, args)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_BY_DEFAULT)]
    return Outcome(result.exit_code, result.stderr, result.exception, shown), out


def _read(directory: Path) -> pl.DataFrame:
    files = sorted(directory.rglob("*.parquet")) if directory.exists() else []
    frames = [pl.read_parquet(f) for f in files]
    frames = [f.select("uid", "shard", "row") if "uid" in f.columns else f for f in frames if f.height]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame(schema={"uid": pl.String, "shard": pl.String, "row": pl.Int64})


def test_there_are_at_least_20_kinds():
    assert len({c.name for c in CASES}) == len(CASES) >= 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=([pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
                     + ([pytest.mark.ray] if c.executor == "ray" else []))
        for c in CASES
    ],
)
def test_bad_input(tmp_path, case):
    result, out = _run(tmp_path, case)
    # bad input is said in mmbalance's own lines: no stray library warning beside them (a plot of no rows, a NaN compared)
    assert not result.warnings, result.warnings
    if isinstance(case.expect, Error):
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2, (result.exit_code, result.stderr, result.detail)
        assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), result.stderr
        for name in case.expect.names:
            assert name in lines[0], (name, lines[0])
        assert "Traceback" not in result.stderr
        # a run that stops on bad input leaves nothing that looks finished
        assert not (out / "manifest").exists() and not (out / "report.json").exists()
        return

    assert result.exit_code == 0, (result.exit_code, result.stderr, result.detail)
    report = json.loads((out / "report.json").read_text())
    manifest, rejects = _read(out / "manifest"), _read(out / "rejects")
    reasons = pl.concat([pl.read_parquet(f) for f in sorted((out / "rejects").rglob("*.parquet"))]) if rejects.height else None

    # accounting: every input row is in exactly one of manifest and rejects
    assert report["rows"]["input"] == case.expect.input
    assert manifest.height + rejects.height == case.expect.input
    assert report["rows"]["manifest"] == manifest.height and report["rows"]["rejected"] == rejects.height
    keys = pl.concat([manifest.select("shard", "row"), rejects.select("shard", "row")])
    assert keys.unique().height == keys.height
    assert rejects.height == sum(case.expect.reasons.values()), reasons
    for needle, count in case.expect.reasons.items():
        hits = reasons.filter(pl.col("reason").str.contains(needle, literal=True)).height
        assert hits == count, (needle, reasons["reason"].to_list())
    # every manifest uid is readable text and unique
    assert manifest["uid"].n_unique() == manifest.height
