"""S3 transfers with every byte checked by sha256, for tests that look inside the bucket.

In Kiln MLflow moves the bytes (the bucket is its artifact store) and :mod:`kiln.tasks.registry.storage`
checks packages before an engine loads; the tests use these functions to put objects into a bucket and to
read an engine back from it with its checksum proven.

Uploads carry their sha256 twice: as the S3 checksum the server computes and returns (``ChecksumSHA256``,
composite ``<digest>-<parts>`` for multipart uploads) and as the ``kiln-sha256`` metadata entry that
downloads check against. A package (``kiln.json`` + files) is uploaded with ``kiln.json`` last, so a
half-uploaded package has no ``kiln.json`` and reads as incomplete.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError
from kiln.tasks.engines.base import sha256_file
from kiln.tasks.models.predictor import META_FILE, WEIGHT_SUFFIXES, PackageMeta, verify
from kiln.tasks.registry.storage import _s3_error, local_path, verify_package

SHA_KEY = "kiln-sha256"  # user metadata: x-amz-meta-kiln-sha256
CHUNK_BYTES = 8 << 20  # multipart part size (boto3's default); the composite checksum depends on it


def upload_file(client: Any, path: Path, bucket: str, key: str, *, reread: bool = False,
                transfer: Any = None) -> str:
    """Upload ``path`` to ``s3://bucket/key`` and prove the stored object has its bytes; returns the sha256.

    The server's own SHA-256 checksum of what it stored is compared with the local file's; where the
    server keeps none, or ``reread`` is set (engines: the cost of one download buys certainty), the
    object is downloaded again and hashed.
    """
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    transfer = transfer or TransferConfig(multipart_chunksize=CHUNK_BYTES)
    digest = sha256_file(path)
    try:
        client.upload_file(str(path), bucket, key, Config=transfer,
                           ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {SHA_KEY: digest}})
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        raise _s3_error(exc, f"s3://{bucket}/{key}") from exc
    where = f"s3://{bucket}/{key}"
    if head.get("ContentLength") != path.stat().st_size or head.get("Metadata", {}).get(SHA_KEY) != digest:
        raise ArtifactError(f"upload of {path.name} to {where} is incomplete (size or checksum metadata differs); "
                            "upload it again")
    # s3transfer uploads in parts from multipart_threshold on; the stored checksum is then a composite.
    parts = _part_size(transfer, path) if path.stat().st_size >= transfer.multipart_threshold else None
    remote = head.get("ChecksumSHA256")
    if remote and remote.split("-")[0] != s3_checksum(path, parts).split("-")[0]:  # some stores omit "-N"
        raise ArtifactError(f"upload of {path.name} to {where} is corrupt (the stored SHA-256 differs); upload it "
                            "again")
    if reread or not remote:
        got = _stream_sha256(client, bucket, key)
        if got != digest:
            raise ArtifactError(f"upload of {path.name} to {where} reads back different bytes (sha256 {got[:12]}… "
                                f"!= {digest[:12]}…); upload it again")
    return digest


def download_file(client: Any, bucket: str, key: str, dst: Path, expected: str | None = None) -> str:
    """Download ``s3://bucket/key`` to ``dst`` checking its sha256 (``expected``, else its ``kiln-sha256``)."""
    from botocore.exceptions import ClientError

    where = f"s3://{bucket}/{key}"
    partial = dst.with_name(dst.name + ".partial")
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        with partial.open("wb") as fh:
            for chunk in obj["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
    except ClientError as exc:
        partial.unlink(missing_ok=True)
        raise _s3_error(exc, where) from exc
    want = expected or obj.get("Metadata", {}).get(SHA_KEY)
    if want and digest.hexdigest() != want:
        partial.unlink(missing_ok=True)
        raise ArtifactError(f"{where} is corrupt (sha256 {digest.hexdigest()[:12]}… != recorded {want[:12]}…); "
                            "publish it again")
    partial.replace(dst)
    return digest.hexdigest()


def upload_package(client: Any, folder: Path, bucket: str, prefix: str) -> str:
    """Upload a verified package under ``prefix``; weights and engines are read back. Returns its ``s3://`` URI."""
    verify(folder, PackageMeta.read(folder))  # every file listed in kiln.json and matching it
    prefix = prefix.strip("/")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META_FILE)
    for path in files:
        upload_file(client, path, bucket, f"{prefix}/{path.relative_to(folder).as_posix()}",
                    reread=path.suffix in WEIGHT_SUFFIXES)
    upload_file(client, folder / META_FILE, bucket, f"{prefix}/{META_FILE}")  # last: marks the package complete
    return f"s3://{bucket}/{prefix}"


def download_package(client: Any, uri: str, dst: Path, tags: Mapping[str, str] | None = None) -> Path:
    """Download the package at ``s3://bucket/prefix`` into ``dst`` and verify it against the registry ``tags``
    (their ``kiln.package_digest`` pin; none refuses) before anything loads it."""
    from botocore.exceptions import ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    except ClientError as exc:
        raise _s3_error(exc, uri) from exc
    if f"{prefix}/{META_FILE}" not in keys:
        raise ArtifactError(f"{uri} holds no complete Kiln package (no {META_FILE}); publish it again")
    partial = dst.with_name(dst.name + ".partial")
    targets = [(key, local_path(partial, key[len(prefix) + 1:], uri)) for key in keys]  # all checked before any write
    shutil.rmtree(partial, ignore_errors=True)
    for key, target in targets:
        download_file(client, bucket, key, target)
    try:
        verify_package(partial, tags or {}, uri)
    except ArtifactError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(dst, ignore_errors=True)
    partial.rename(dst)
    return dst



def s3_checksum(path: Path, part_size: int | None = None) -> str:
    """The ``ChecksumSHA256`` S3 reports for ``path``: base64 sha256 of the bytes, or, uploaded in parts of
    ``part_size``, the composite ``base64(sha256(part digests))-N``."""
    if part_size is None:
        return base64.b64encode(bytes.fromhex(sha256_file(path))).decode()
    digests = []
    with path.open("rb") as fh:
        for part in iter(lambda: fh.read(part_size), b""):
            digests.append(hashlib.sha256(part).digest())
    return f"{base64.b64encode(hashlib.sha256(b''.join(digests)).digest()).decode()}-{len(digests)}"



def _part_size(transfer: Any, path: Path) -> int:
    from s3transfer.utils import ChunksizeAdjuster

    return ChunksizeAdjuster().adjust_chunksize(transfer.multipart_chunksize, path.stat().st_size)


def _stream_sha256(client: Any, bucket: str, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()
