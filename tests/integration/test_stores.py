"""The configured stores: MLflow on PostgreSQL with artifacts proxied to S3 (SeaweedFS), as ``kiln up`` runs it.

One optimize run (tiny classifier, INT8 only) goes through that server; its challenger's engine is
fetched back from the bucket with verified checksums, and an object corrupted in the bucket is refused
before anything loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from kiln.errors import ArtifactError
from kiln.flows.optimize import OptimizeParams, optimize
from kiln.infra import stack, stack_databases, stack_services
from kiln.settings import load_settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta
from kiln.tasks.registry import client as registry
from kiln.tasks.registry import storage
from kiln.tasks.registry.onboard import register_folder
from tests import s3_transfer
from tests.stores import free_port


@pytest.fixture(scope="module")
def stores(postgres, seaweedfs, tmp_path_factory):
    """``kiln up``'s MLflow service alone, on a fresh database and bucket; the tests' KILN_* point at it."""
    root = tmp_path_factory.mktemp("stores")
    bucket = seaweedfs.create_bucket()
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("KILN_")]:
            mp.delenv(key)
        for key, value in seaweedfs.env().items():
            mp.setenv(key, value)
        mp.chdir(root)
        mp.setenv("KILN_HOME", str(root / ".kiln"))
        mp.setenv("KILN_BENCH_SECONDS", "0.2")
        mp.setenv("KILN_DATABASE_URL", postgres.url("kiln_stores"))
        mp.setenv("KILN_S3_BUCKET", bucket)
        mp.setenv("KILN_S3_ENDPOINT_URL", seaweedfs.endpoint)
        mp.setenv("KILN_MLFLOW_PORT", str(free_port()))
        settings = load_settings()
        assert stack_databases.ensure_databases(settings.database_url) == ["kiln_stores", "kiln_stores_prefect"]
        [mlflow_service] = [s for s in stack_services.services(settings) if s.name == "mlflow"]
        assert f"s3://{bucket}/mlflow" in mlflow_service.argv
        # The database URL (with its password) reaches the server in its environment, not on its command line.
        assert mlflow_service.env["MLFLOW_BACKEND_STORE_URI"] == stack_databases.database_urls(settings.database_url)[0]
        assert "kiln_stores" not in " ".join(mlflow_service.argv)
        server = stack.Stack(settings.home / "stack", [mlflow_service])
        server.up()
        try:
            mp.setenv("KILN_TRACKING_URI", mlflow_service.url)
            yield SimpleNamespace(settings=load_settings(), bucket=bucket, s3=seaweedfs.client(), postgres=postgres)
        finally:
            server.down()


@pytest.fixture(scope="module")
def challenger(stores, tiny_models, tiny_spec):
    """The challenger an INT8 optimize run registered, with the S3 key of its engine."""
    client = registry.connect(stores.settings)
    register_folder(client, stores.settings, tiny_models["bert"], "tiny", "sequence-classification", tiny_spec)
    optimize(OptimizeParams(model="tiny", recipes=["int8-dynamic"]))
    version = client.get_model_version_by_alias("tiny", vocab.CHALLENGER)
    model_id = version.source.removeprefix("models:/")
    keys = [o["Key"] for page in stores.s3.get_paginator("list_objects_v2").paginate(Bucket=stores.bucket)
            for o in page.get("Contents", [])]
    [engine_key] = [k for k in keys if model_id in k and k.endswith("/model/model.onnx")]
    return SimpleNamespace(client=client, version=version, engine_key=engine_key)


def test_optimize_round_trips_a_verified_engine_through_postgres_and_s3(stores, challenger, tmp_path):
    version = challenger.version
    assert version.tags["kiln.gate"] == "passed" and version.tags["kiln.recipe"] == "int8-dynamic"
    assert mlflow.get_tracking_uri().startswith("http://127.0.0.1:")

    # The registry lives in PostgreSQL ...
    with stores.postgres.connect("kiln_stores") as conn:
        rows = conn.execute("SELECT version FROM model_versions WHERE name = 'tiny' ORDER BY version").fetchall()
    assert [row[0] for row in rows] == [1, 2]

    # ... the engine in the bucket, byte for byte what the registry recorded.
    folder = registry.fetch_package(challenger.client, version, tmp_path / "downloads")
    meta = storage.verify_package(folder, version.tags)
    assert meta.format == "onnx" and meta.sha256 == json.loads(version.tags["kiln.sha256"])
    digest = s3_transfer.download_file(stores.s3, stores.bucket, challenger.engine_key, tmp_path / "engine.onnx",
                                   expected=meta.sha256["model.onnx"])
    assert digest == meta.sha256["model.onnx"]
    predictions = mlflow.pyfunc.load_model("models:/tiny@challenger").predict(["what a day"])
    assert predictions["label"][0] in PackageMeta.read(folder).labels


def test_an_engine_corrupted_in_the_bucket_is_refused_before_loading(stores, challenger, tmp_path):
    s3, key = stores.s3, challenger.engine_key
    original = s3.get_object(Bucket=stores.bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=stores.bucket, Key=key, Body=original[:-64] + bytes(64))  # same size, last bytes zeroed
    try:
        with pytest.raises(ArtifactError, match=r"model file model.onnx in .* is corrupt \(sha256 mismatch\)"):
            registry.fetch_package(challenger.client, challenger.version, tmp_path / "downloads")
        with pytest.raises(ArtifactError, match="corrupt"):
            mlflow.pyfunc.load_model("models:/tiny@challenger")
    finally:
        s3.put_object(Bucket=stores.bucket, Key=key, Body=original)
    assert Path(registry.fetch_package(challenger.client, challenger.version, tmp_path / "again")).is_dir()


def test_a_kiln_json_rewritten_in_the_bucket_is_refused_by_its_registry_pin(stores, challenger, tmp_path):
    """Swapped labels in the bucket's kiln.json: every checksum inside still matches, the registry's pin does not."""
    s3, key = stores.s3, challenger.engine_key.rsplit("/", 1)[0] + "/kiln.json"
    original = s3.get_object(Bucket=stores.bucket, Key=key)["Body"].read()
    meta = json.loads(original)
    meta["labels"] = list(reversed(meta["labels"]))
    s3.put_object(Bucket=stores.bucket, Key=key, Body=json.dumps(meta, indent=2, sort_keys=True).encode())
    try:
        with pytest.raises(ArtifactError, match="is not the manifest the registry pinned for tiny v2"):
            registry.fetch_package(challenger.client, challenger.version, tmp_path / "downloads")
        with pytest.raises(ArtifactError, match="is not the manifest the registry pinned"):
            mlflow.pyfunc.load_model("models:/tiny@challenger")
    finally:
        s3.put_object(Bucket=stores.bucket, Key=key, Body=original)
    assert Path(registry.fetch_package(challenger.client, challenger.version, tmp_path / "again")).is_dir()
