"""A package download never writes outside its folder: object keys with ``../`` or absolute ones are refused
before anything is written (tasks/registry/storage.py ``local_path``, used by tests/s3_transfer.py), against
moto's in-process S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import ArtifactError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta, record_checksums
from kiln.tasks.registry import storage
from kiln.tasks.registry.pins import package_digest
from tests import s3_transfer

moto = pytest.importorskip("moto", reason="moto is missing: pip install -e '.[test]'")

BUCKET = "kiln-keys"


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with moto.mock_aws():
        client = storage.s3_client(Settings(s3_region="us-east-1"))
        storage.ensure_bucket(client, BUCKET)
        yield client


@pytest.mark.parametrize("key", ["../escaped.txt", "a/../../escaped.txt", "sub/../../../escaped.txt",
                                 "/etc/escaped.txt", "..", "", "..\\escaped.txt", "C:/escaped.txt"],
                         ids=["parent", "nested-parent", "deep-parent", "absolute", "dotdot", "empty",
                              "backslash-parent", "drive-letter"])
def test_keys_outside_the_folder_are_refused(tmp_path, key):
    with pytest.raises(ArtifactError, match="points outside the package folder"):
        storage.local_path(tmp_path / "pkg", key, "s3://b/p")


@pytest.mark.parametrize("key", ["model.onnx", "tokenizer/vocab.txt", "a/b/c.bin", "weird..name.bin"])
def test_keys_inside_the_folder_map_under_it(tmp_path, key):
    assert storage.local_path(tmp_path / "pkg", key, "s3://b/p") == (tmp_path / "pkg" / key).resolve()


def test_a_package_with_a_traversal_key_writes_nothing_anywhere(s3, tmp_path: Path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx" * 100)
    record_checksums(folder, PackageMeta(format="onnx", task="sequence-classification", labels=["a", "b"]))
    uri = s3_transfer.upload_package(s3, folder, BUCKET, "engines/tiny/v1")
    # Someone with write access to the bucket adds an object whose key climbs out of the package's folder.
    s3.put_object(Bucket=BUCKET, Key="engines/tiny/v1/../../../../escaped.txt", Body=b"owned")
    tags = {vocab.PACKAGE_DIGEST: package_digest(folder)}
    out = tmp_path / "deep" / "er" / "back"
    with pytest.raises(ArtifactError, match=r"'\.\./\.\./\.\./\.\./escaped\.txt', which points outside"):
        s3_transfer.download_package(s3, uri, out, tags)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not out.exists() and not out.with_name("back.partial").exists()
