"""``rebalance --update``: a corpus that grew, changed or shrank since its run. The update rescans only
the added and changed shards, drops the removed ones, redoes what depends on them, and ends with
every file, done markers included (timings aside), byte-identical to a fresh run over the new input.

The corpus is made for the hard parts: the added shard sorts between two old ones (every later
shard's index moves) and repeats uids of an old shard before it (its rows are duplicates) and of one
after it (the old shard's rows become duplicates: that shard's signatures change though its file
did not); one change keeps the size (same shard id), one does not; the fit sample (bottom-k by uid
hash over the whole corpus) changes with every update, and with it the clusters and everything after.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpora import RECIPE_FROM_ISSUE, held_out_table, run_outputs

from mmbalance.pipeline.sampling import sample_threshold
from mmbalance.pipeline.rebalance import Rebalancer, RunOptions, rebalance
from mmbalance.schemas.contract import InputError
from mmbalance.io.recipes import load_recipe

RECIPE = RECIPE_FROM_ISSUE.replace("balance:", """clusters: [{name: concept, embedding: image, k: 8, niter: 5, nredo: 1}]
sample: {size: 2000}
report: {html: false, leakage: false}
balance:""").replace("cap: 1000", "cap: 300")
SIZES = {"shard-0.parquet": 3000, "shard-1.parquet": 3000, "shard-2.parquet": 3000, "shard-3.parquet": 600}


def table(rows: int, seed: int) -> pa.Table:
    return held_out_table(rows, seed=seed, dim=16, fixed_size=True)


def write(path: Path, t: pa.Table) -> None:
    pq.write_table(t, path, write_page_checksum=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    base = tmp_path_factory.mktemp("update")
    (base / "corpus").mkdir()
    for i, (name, rows) in enumerate(SIZES.items()):
        write(base / "corpus" / name, table(rows, 700 + i))
    (base / "r.yaml").write_text(RECIPE)
    recipe = load_recipe(base / "r.yaml")
    rebalance(str(base / "corpus"), str(base / "run"), recipe, RunOptions(executor="local", show_progress=False))
    return {"base": base, "recipe": recipe}


def added_shard(corpus: Path) -> None:
    """shard-1a sorts between shard-1 and shard-2; 100 of its uids are shard-0's (its copies are
    duplicates) and 200 are shard-2's (shard-2's copies become the duplicates)."""
    t = table(2500, 800)
    uids = t.column("uid").to_pylist()
    uids[:100] = pq.read_table(corpus / "shard-0.parquet").column("uid").to_pylist()[:100]
    uids[100:300] = pq.read_table(corpus / "shard-2.parquet").column("uid").to_pylist()[500:700]
    write(corpus / "shard-1a.parquet", t.set_column(0, "uid", pa.array(uids)))


def changed_shards(corpus: Path) -> None:
    """shard-1 rewritten with other rows (another size: another shard id); shard-2 with its
    occupation column permuted (the same size and footer: the same id, another content)."""
    write(corpus / "shard-1.parquet", table(3000, 901))
    t = pq.read_table(corpus / "shard-2.parquet")
    occupation = np.asarray(t.column("occupation").to_pylist(), dtype=object)[np.random.default_rng(1).permutation(t.num_rows)]
    write(corpus / "shard-2.parquet", t.set_column(t.schema.get_field_index("occupation"), "occupation", pa.array(list(occupation))))


SCENARIOS = {
    # name: (how the corpus changes, shards scanned by the update, the plan's summary of the changes)
    "add": (added_shard, 1, "1 added"),
    "change": (changed_shards, 2, "2 changed"),
    "remove": (lambda c: (c / "shard-3.parquet").unlink(), 0, "1 removed"),
    # 3,000 of 9,600 rows gone: the fit-sample threshold rises a step, so every scan is redone
    "remove-large": (lambda c: (c / "shard-0.parquet").unlink(), 3, "1 removed"),
}


def update_and_compare(baseline, tmp_path: Path, change, scanned: int, summary: str, executor: str = "local") -> list[str]:
    corpus, out, fresh = tmp_path / "corpus", tmp_path / "out", tmp_path / "fresh"
    shutil.copytree(baseline["base"] / "corpus", corpus)  # copy2: modification times kept, fingerprints equal
    shutil.copytree(baseline["base"] / "run", out)
    change(corpus)
    recipe = baseline["recipe"]
    with pytest.raises(InputError, match="pass --update to redo only what the changed shards affect"):
        rebalance(str(corpus), str(out), recipe, RunOptions(executor="local", show_progress=False))
    planned = Rebalancer(str(corpus), str(out), recipe, RunOptions(update=True)).plan()
    assert planned["status"].startswith(f"update ({summary} shards")
    assert next(r for r in planned["stages"] if r["stage"] == "scan")["to_do"] == scanned
    ran: list[str] = []
    options = RunOptions(executor=executor, update=True, show_progress=False, on_progress=lambda n, s: ran.append(n))
    rebalance(str(corpus), str(out), recipe, options)
    rebalance(str(corpus), str(fresh), recipe, RunOptions(executor="local", show_progress=False))
    assert ran.count("scan") == scanned
    assert run_outputs(out, markers=True) == run_outputs(fresh, markers=True)
    return ran


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_update_ends_byte_identical_to_a_fresh_run_rescanning_only_what_changed(baseline, tmp_path, scenario):
    change, scanned, summary = SCENARIOS[scenario]
    update_and_compare(baseline, tmp_path, change, scanned, summary)


def test_a_grown_corpus_narrows_the_kept_sample_candidates_instead_of_rescanning(baseline):
    """The threshold steps the scenarios rely on: adding 2,500 rows lowers it (narrowed), removing 600
    keeps it, removing 3,000 raises it (rescanned)."""
    recipe = baseline["recipe"]
    total = sum(SIZES.values())
    assert sample_threshold(recipe, total + 2500) < sample_threshold(recipe, total)
    assert sample_threshold(recipe, total - 600) == sample_threshold(recipe, total)
    assert sample_threshold(recipe, total - 3000) > sample_threshold(recipe, total)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_update_on_ray_adding_changing_and_removing_at_once(baseline, tmp_path, ray_cluster):
    def change(corpus: Path) -> None:
        added_shard(corpus)
        changed_shards(corpus)
        (corpus / "shard-3.parquet").unlink()

    update_and_compare(baseline, tmp_path, change, 3, "1 added, 2 changed, 1 removed", executor="ray")


@pytest.mark.parametrize("kind", ["added", "removed"])
def test_without_update_an_added_or_removed_shard_is_named_as_such(baseline, tmp_path, kind):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    shutil.copytree(baseline["base"] / "corpus", corpus)
    shutil.copytree(baseline["base"] / "run", out)
    if kind == "added":
        added_shard(corpus)
        name = "shard-1a.parquet"
    else:
        (corpus / "shard-3.parquet").unlink()
        name = "shard-3.parquet"
    with pytest.raises(InputError) as err:
        rebalance(str(corpus), str(out), baseline["recipe"], RunOptions(executor="local", show_progress=False))
    assert str(err.value) == (f"{name}: input shard {kind} since the run in {out} started; pass --update to redo only "
                              "what the changed shards affect, --overwrite to redo the run, or choose another --out")


def test_update_refuses_another_recipe(baseline, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(baseline["base"] / "run", out)
    other = load_recipe(baseline["base"] / "r.yaml").model_copy(update={"sample": baseline["recipe"].sample.model_copy(update={"size": 999})})
    with pytest.raises(InputError, match=r"holds a run with a different recipe \(--update keeps the recipe"):
        rebalance(str(baseline["base"] / "corpus"), str(out), other, RunOptions(executor="local", update=True, show_progress=False))
