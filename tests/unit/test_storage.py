"""tasks/registry/storage.py and the tests' checked S3 transfers (tests/s3_transfer.py) against moto's
in-process S3: checksums on upload, on download and on packages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import Settings
from kiln.tasks.models.predictor import PackageMeta, record_checksums
from kiln.tasks.registry import storage
from tests import s3_transfer

moto = pytest.importorskip("moto", reason="moto is missing: pip install -e '.[test]'")

BUCKET = "kiln-unit"


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with moto.mock_aws():
        client = storage.s3_client(Settings(s3_region="us-east-1"))
        assert storage.ensure_bucket(client, BUCKET) is True
        yield client


def _package(folder: Path, engine: bytes = b"onnx-bytes" * 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(engine)
    (folder / "tokenizer.json").write_text("{}")
    record_checksums(folder, PackageMeta(format="onnx", task="sequence-classification", labels=["a", "b"]))
    return folder


def test_ensure_bucket_is_idempotent(s3):
    assert storage.ensure_bucket(s3, BUCKET) is False
    assert BUCKET in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_upload_records_and_checks_sha256(s3, tmp_path):
    path = tmp_path / "engine.onnx"
    path.write_bytes(b"x" * 5000)
    digest = s3_transfer.upload_file(s3, path, BUCKET, "engines/e.onnx", reread=True)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    head = s3.head_object(Bucket=BUCKET, Key="engines/e.onnx", ChecksumMode="ENABLED")
    assert head["Metadata"][s3_transfer.SHA_KEY] == digest
    assert head["ChecksumSHA256"] == s3_transfer.s3_checksum(path)

    assert s3_transfer.download_file(s3, BUCKET, "engines/e.onnx", tmp_path / "back.onnx") == digest
    assert (tmp_path / "back.onnx").read_bytes() == path.read_bytes()


def test_multipart_upload_matches_the_composite_checksum(s3, tmp_path):
    from boto3.s3.transfer import TransferConfig

    path = tmp_path / "big.bin"
    path.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: three 5 MiB parts
    transfer = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    s3_transfer.upload_file(s3, path, BUCKET, "big.bin", transfer=transfer)
    remote = s3.head_object(Bucket=BUCKET, Key="big.bin", ChecksumMode="ENABLED").get("ChecksumSHA256")
    assert s3_transfer.s3_checksum(path, 5 << 20).endswith("-3")
    assert remote.split("-")[0] == s3_transfer.s3_checksum(path, 5 << 20).split("-")[0]  # moto leaves out "-3"


class _Rotting:
    """A client whose store mangles what it keeps: reports another checksum, or reads back other bytes."""

    def __init__(self, client, what: str) -> None:
        self._client, self._what = client, what

    def __getattr__(self, name):  # noqa: ANN204
        return getattr(self._client, name)

    def head_object(self, **kwargs):  # noqa: ANN201
        head = self._client.head_object(**kwargs)
        if self._what == "checksum":
            head["ChecksumSHA256"] = "AAAA" + head["ChecksumSHA256"][4:]
        return head

    def get_object(self, **kwargs):  # noqa: ANN201
        import io

        from botocore.response import StreamingBody

        obj = self._client.get_object(**kwargs)
        obj["Body"] = StreamingBody(io.BytesIO(b"rotten"), 6)
        return obj


@pytest.mark.parametrize("what", ["checksum", "bytes"])
def test_an_upload_the_store_does_not_hold_faithfully_is_refused(s3, tmp_path, what):
    path = tmp_path / "engine.onnx"
    path.write_bytes(b"engine" * 100)
    with pytest.raises(ArtifactError, match="stored SHA-256 differs" if what == "checksum" else "reads back"):
        s3_transfer.upload_file(_Rotting(s3, what), path, BUCKET, "e.onnx", reread=True)


def test_a_corrupt_download_is_refused_and_leaves_no_file(s3, tmp_path):
    path = tmp_path / "engine.onnx"
    path.write_bytes(b"good" * 100)
    s3_transfer.upload_file(s3, path, BUCKET, "e.onnx")
    # Someone rewrites the object behind Kiln's back, keeping the metadata.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    s3.put_object(Bucket=BUCKET, Key="e.onnx", Body=b"evil" * 100, Metadata={s3_transfer.SHA_KEY: digest})
    with pytest.raises(ArtifactError, match=r"s3://kiln-unit/e.onnx is corrupt"):
        s3_transfer.download_file(s3, BUCKET, "e.onnx", tmp_path / "out" / "e.onnx")
    assert not any((tmp_path / "out").iterdir())


def test_package_round_trip_and_tamper_detection(s3, tmp_path):
    folder = _package(tmp_path / "pkg")
    uri = s3_transfer.upload_package(s3, folder, BUCKET, "engines/tiny/v2")
    assert uri == f"s3://{BUCKET}/engines/tiny/v2"
    tags = {"kiln.sha256": json.dumps(PackageMeta.read(folder).sha256)}
    back = s3_transfer.download_package(s3, uri, tmp_path / "back", tags)
    assert (back / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()

    # Swap engine and kiln.json together: self-consistent, but not what the registry recorded.
    evil = _package(tmp_path / "evil", engine=b"evil" * 100)
    for name in ("model.onnx", "kiln.json"):
        s3.upload_file(str(evil / name), BUCKET, f"engines/tiny/v2/{name}")
    with pytest.raises(ArtifactError, match="does not match the checksums the registry recorded"):
        s3_transfer.download_package(s3, uri, tmp_path / "again", tags)
    assert not (tmp_path / "again").exists()


def test_verify_package_catches_files_kiln_json_does_not_know(tmp_path):
    folder = _package(tmp_path / "pkg")
    storage.verify_package(folder)
    (folder / "model.onnx.data").write_bytes(b"extra weights")
    with pytest.raises(ArtifactError, match=r"does not record \(model.onnx.data\)"):
        storage.verify_package(folder)


def test_source_versions_are_checked_against_their_registered_digest(tmp_path):
    folder = _package(tmp_path / "pkg")
    digest = PackageMeta.read(folder).sha256["model.onnx"]
    storage.verify_package(folder, {"kiln.source_sha256": digest})
    with pytest.raises(ArtifactError, match="kiln.source_sha256"):
        storage.verify_package(folder, {"kiln.source_sha256": "0" * 64})


def test_a_missing_package_is_an_artifact_error(s3, tmp_path):
    with pytest.raises(ArtifactError, match="no complete Kiln package"):
        s3_transfer.download_package(s3, f"s3://{BUCKET}/engines/none/v1", tmp_path / "x")


def test_missing_credentials_say_which_variables_to_set(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no S3 credentials: set AWS_ACCESS_KEY_ID"):
        storage.ensure_bucket(storage.s3_client(Settings(s3_endpoint_url="http://127.0.0.1:9")), "kiln-bucket")
