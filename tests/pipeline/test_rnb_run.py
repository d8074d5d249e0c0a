"""R&B end to end: the sample stage feeds the proxy run; an evaluation directory sets p_eval."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from corpora import write_shards

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.schemas.recipe import parse_recipe
from mmbalance.synth import synth_corpus


def test_rnb_with_an_evaluation_directory(tmp_path):
    synth_corpus(tmp_path / "corpus", rows=6000, shards=2, seed=3, dim=16, images=False)
    # evaluation rows: only nurses (same generator and centres, other rows)
    synth_corpus(tmp_path / "evalsrc", rows=3000, shards=1, seed=3, dim=16, images=False)
    table = pq.read_table(next((tmp_path / "evalsrc").glob("*.parquet")))
    write_shards(tmp_path / "eval", {"e.parquet": table.filter(pc.equal(table.column("occupation"), "nurse"))})
    recipe = parse_recipe({
        "input": {"columns": {"uid": "uid", "image_embedding": "image_emb", "text_embedding": "text_emb"}},
        "labels": [{"name": "occupation"}],
        "sample": {"size": 4000},
        "balance": {"method": "rnb", "by": "occupation", "rounds": 2, "steps_per_round": 10, "eval_path": str(tmp_path / "eval")},
    })
    result = rebalance(str(tmp_path / "corpus"), str(tmp_path / "o"), recipe, RunOptions(executor="local", show_progress=False, html_report=False))
    diag = result.report["solution"]
    assert diag["p_eval_source"].startswith("eval_sample")
    p_eval = dict(zip(diag["domains"], diag["p_eval"]))
    # occupations are mixtures of 3 subclasses, so nearest-domain assignment is imperfect but must favour nurse
    assert max(p_eval, key=p_eval.get) == "nurse" and p_eval["nurse"] > 3 / len(p_eval)
    assert result.report["weights"]["rows"] == 6000 and np.isfinite(result.report["weights"]["expected_rows"])
