"""tasks/registry/storage.py and the tests' checked S3 transfers (tests/s3_transfer.py) against moto's
in-process S3: checksums on upload, on download and on packages; the registry's pin on a package
(tasks/registry/pins.py) and kiln.json listing every file (tasks/models/predictor.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta, record_checksums, size_mb, verify
from kiln.tasks.registry import storage
from kiln.tasks.registry.pins import package_digest
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


def _pin(folder: Path) -> dict[str, str]:
    """The registry tags of a version registered from ``folder``: its pin (and the checksum list, as publish writes)."""
    return {vocab.PACKAGE_DIGEST: package_digest(folder), vocab.SHA256: json.dumps(PackageMeta.read(folder).sha256)}


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
    tags = _pin(folder)
    back = s3_transfer.download_package(s3, uri, tmp_path / "back", tags)
    assert (back / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()

    # Swap engine and kiln.json together: self-consistent, but not what the registry recorded.
    evil = _package(tmp_path / "evil", engine=b"evil" * 100)
    for name in ("model.onnx", "kiln.json"):
        s3.upload_file(str(evil / name), BUCKET, f"engines/tiny/v2/{name}")
    with pytest.raises(ArtifactError, match="is not the manifest the registry pinned"):
        s3_transfer.download_package(s3, uri, tmp_path / "again", tags)
    assert not (tmp_path / "again").exists()
    # Without the registry's tags there is nothing to check against: refused, not waved through.
    with pytest.raises(ArtifactError, match=r"kiln.package_digest is missing"):
        s3_transfer.download_package(s3, uri, tmp_path / "untagged")


def test_verify_package_catches_files_kiln_json_does_not_know(tmp_path):
    folder = _package(tmp_path / "pkg")
    storage.verify_package(folder, _pin(folder))
    (folder / "model.onnx.data").write_bytes(b"extra weights")
    with pytest.raises(ArtifactError, match=r"does not record \(model.onnx.data\)"):
        storage.verify_package(folder, _pin(folder))


@pytest.mark.parametrize("extra", ["added_tokens.json", "sub/merges.txt", "README.md"])
def test_any_file_kiln_json_does_not_list_is_refused(tmp_path, extra):
    folder = _package(tmp_path / "pkg")
    tags = _pin(folder)
    (folder / extra).parent.mkdir(parents=True, exist_ok=True)
    (folder / extra).write_text("{}")
    with pytest.raises(ArtifactError, match=rf"does not record \({extra}\)"):
        storage.verify_package(folder, tags)


def test_source_versions_are_checked_against_their_registered_digest(tmp_path):
    folder = _package(tmp_path / "pkg")
    digest = PackageMeta.read(folder).sha256["model.onnx"]
    storage.verify_package(folder, _pin(folder) | {"kiln.source_sha256": digest})
    with pytest.raises(ArtifactError, match="kiln.source_sha256"):
        storage.verify_package(folder, _pin(folder) | {"kiln.source_sha256": "0" * 64})


def test_kiln_json_records_every_file_and_size_counts_only_weights(tmp_path):
    folder = _package(tmp_path / "pkg")
    (folder / "config.json").write_text('{"id2label": {"0": "a", "1": "b"}}')
    (folder / "model.plan.json").write_text("{}")
    record_checksums(folder, PackageMeta.read(folder))
    recorded = PackageMeta.read(folder).sha256
    assert sorted(recorded) == ["config.json", "model.onnx", "model.plan.json", "tokenizer.json"]
    assert recorded["tokenizer.json"] == hashlib.sha256(b"{}").hexdigest()
    assert size_mb(folder) == (folder / "model.onnx").stat().st_size / 1e6  # weights and engine only, as before


@pytest.mark.parametrize("pin", [None, "", "not-a-digest", "0" * 63, "0" * 64 + "0"])
def test_a_missing_or_malformed_pin_refuses(tmp_path, pin):
    folder = _package(tmp_path / "pkg")
    tags = {} if pin is None else {vocab.PACKAGE_DIGEST: pin}
    state = "missing" if not pin else "malformed"
    with pytest.raises(ArtifactError, match=rf"kiln.package_digest is {state}.*re-register the model"):
        storage.verify_package(folder, tags)


def test_a_pin_for_another_package_refuses(tmp_path):
    folder = _package(tmp_path / "pkg")
    other = _package(tmp_path / "other", engine=b"other" * 100)
    with pytest.raises(ArtifactError, match="is not the manifest the registry pinned"):
        storage.verify_package(folder, _pin(other))


@pytest.mark.parametrize("change", ["labels", "seq_len", "tokenizer"])
def test_the_pin_covers_more_than_the_weights(tmp_path, change):
    """Swapped labels, another sequence length, or another tokenizer: weights untouched, still refused."""
    folder = _package(tmp_path / "pkg")
    tags = _pin(folder)
    meta = PackageMeta.read(folder)
    if change == "tokenizer":  # the file changes, and kiln.json is rewritten to match it
        (folder / "tokenizer.json").write_text('{"model": "other"}')
        record_checksums(folder, meta)
    else:
        setattr(meta, change, ["b", "a"] if change == "labels" else 8)
        meta.write(folder)
    verify(folder, PackageMeta.read(folder))  # self-consistent: only the pin can tell
    with pytest.raises(ArtifactError, match="is not the manifest the registry pinned"):
        storage.verify_package(folder, tags)


def test_a_changed_tokenizer_file_is_refused_by_its_checksum(tmp_path):
    folder = _package(tmp_path / "pkg")
    tags = _pin(folder)
    (folder / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(ArtifactError, match=r"model file tokenizer.json in .* is corrupt"):
        storage.verify_package(folder, tags)


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
