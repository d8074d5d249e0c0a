"""Storage settings without a server: credentials refused in a recipe, the endpoint and region each
process applies, URIs shown with their scheme, and schemes pyarrow lacks read through fsspec."""

from __future__ import annotations

import io

import fsspec
import pyarrow.parquet as pq
import pytest
from corpora import held_out_table

from mmbalance.pipeline.rebalance import RunOptions, rebalance
from mmbalance.io.store import RunStore
from mmbalance.schemas.recipe import RecipeError, parse_recipe
from mmbalance.io.storage import configure_storage, display_uri, resolve_filesystem


def test_credentials_in_a_recipe_are_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"storage: 'secret_access_key': credentials are never read from a recipe"):
        parse_recipe({"storage": {"endpoint": "http://127.0.0.1:9000", "secret_access_key": "x"}})
    with pytest.raises(RecipeError, match=r"storage.endpoint: .*http:// or https://"):
        parse_recipe({"storage": {"endpoint": "127.0.0.1:9000"}})
    spec = parse_recipe({"storage": {"endpoint": "http://127.0.0.1:9000/", "region": "eu-west-3", "create_bucket": True}})
    assert spec.storage.endpoint == "http://127.0.0.1:9000"
    assert spec.fingerprint() == parse_recipe({}).fingerprint()  # where files live never changes results


def test_the_storage_settings_reach_s3_filesystems(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    try:
        configure_storage(parse_recipe({"storage": {"endpoint": "http://127.0.0.1:9", "region": "eu-west-3",
                                                    "anonymous": True}}).storage)
        fs, path = resolve_filesystem("s3://bucket/run/")
        assert path == "bucket/run" and fs.region == "eu-west-3"
        assert display_uri("s3://bucket/run", RunStore("s3://bucket/run").path("report.html")) == "s3://bucket/run/report.html"
    finally:
        configure_storage(None)
    assert RunStore("relative/run").uri_of("report.html").endswith("relative/run/report.html")


def test_a_scheme_pyarrow_lacks_is_read_through_fsspec(tmp_path):
    memory = fsspec.filesystem("memory")
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(held_out_table(100, 110 + i), buf)
        memory.pipe(f"/fsspec-corpus/s{i}.parquet", buf.getvalue())
    recipe = parse_recipe({"labels": [{"name": "occupation"}], "report": {"html": False, "leakage": False}})
    result = rebalance("memory://fsspec-corpus", str(tmp_path / "o"), recipe,
                       RunOptions(executor="local", show_progress=False))
    assert result.report["rows"]["input"] == 200 and result.report["input"]["shards"] == 2
