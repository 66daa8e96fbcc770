"""Engines and artifacts in an S3 bucket (AWS, SeaweedFS, MinIO): the client, the bucket, and the package check.

MLflow moves the bytes (the bucket is its artifact store); Kiln checks them. A package (``kiln.json`` +
files) is verified against the registry's pin on its ``kiln.json`` and every file against ``kiln.json``,
before an engine is loaded from it.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles); the endpoint and region from Kiln's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError, ConfigError
from kiln.settings import Settings
from kiln.tasks.core import tags as vocab
from kiln.tasks.models.predictor import PackageMeta, verify
from kiln.tasks.registry.pins import check_pin

log = logging.getLogger(__name__)


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for ``settings.s3_endpoint_url`` (None: AWS) in ``settings.s3_region``."""
    import boto3
    from botocore.config import Config

    # Path-style addressing for self-hosted endpoints: bucket-in-hostname needs wildcard DNS they rarely have.
    config = Config(retries={"max_attempts": 5, "mode": "standard"},
                    s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"})
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config)


def ensure_bucket(client: Any, bucket: str, region: str = "us-east-1") -> bool:
    """Create ``bucket`` unless it exists; True when it was created."""
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        client.head_bucket(Bucket=bucket)
        return False
    except NoCredentialsError as exc:
        raise ConfigError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS "
                          "profile) for the bucket in KILN_S3_BUCKET") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code in {"403", "AccessDenied", "Forbidden"}:
            raise ConfigError(f"bucket {bucket!r} exists but these S3 credentials may not use it; use another "
                              "KILN_S3_BUCKET or credentials with access to it") from exc
        if code not in {"404", "NoSuchBucket", "NotFound"}:
            raise _s3_error(exc, f"s3://{bucket}") from exc
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    try:
        client.create_bucket(Bucket=bucket, **kwargs)
    except ClientError as exc:
        raise ConfigError(f"cannot create bucket {bucket!r} ({_code(exc)}); create it yourself or choose "
                          "another KILN_S3_BUCKET") from exc
    return True


def verify_package(folder: Path, tags: Mapping[str, str], what: str | None = None) -> PackageMeta:
    """Refuse a package unless its ``kiln.json`` is the one the registry pinned and every file matches ``kiln.json``.

    ``tags`` are the registry version's (``what`` names it in messages). Fail closed: a missing or malformed
    ``kiln.package_digest`` refuses, so does any file ``kiln.json`` does not list. The registry is a database the
    bucket cannot rewrite, so swapping files and ``kiln.json`` together in the bucket is caught. The pin covers
    ``kiln.json``'s checksum list, so ``kiln.sha256`` (kept as a tag for people reading the registry) is not
    compared again; a registered source's ``kiln.source_sha256`` (what ``kiln register`` finds it again by) must
    still be one of the pinned files.
    """
    check_pin(folder, tags, what or str(folder))
    meta = PackageMeta.read(folder)
    verify(folder, meta)  # every file against kiln.json, and no file kiln.json does not list
    if vocab.SOURCE_SHA256 in tags and tags[vocab.SOURCE_SHA256] not in meta.sha256.values():
        raise ArtifactError(f"{folder} does not hold the weights the registry recorded ({vocab.SOURCE_SHA256}); "
                            "the stored package was replaced: re-register the model")
    return meta


def local_path(folder: Path, key: str, where: str) -> Path:
    """Where the object ``key`` (relative to a package's prefix) goes under ``folder``; refuses a key that is
    absolute or that resolves outside ``folder`` (``../``, ``a/../../b``), which a bucket writable by others could
    otherwise use to write anywhere the process may."""
    parts = key.replace("\\", "/").split("/")
    target = (folder / key).resolve()
    if key.startswith(("/", "\\")) or (parts and parts[0].endswith(":")) or ".." in parts or \
            not target.is_relative_to(folder.resolve()) or target == folder.resolve():
        raise ArtifactError(f"{where} holds the object key {key!r}, which points outside the package folder; "
                            "refusing to download it: remove that object from the bucket and publish the package again")
    return target


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code") or exc)


def _s3_error(exc: Any, where: str) -> Exception:
    code = _code(exc)
    if code in {"NoSuchKey", "404", "NoSuchBucket"}:
        return ArtifactError(f"{where} does not exist ({code}); publish it again or check KILN_S3_BUCKET")
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return ConfigError(f"S3 refused access to {where} ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return ArtifactError(f"S3 request for {where} failed ({code}); check KILN_S3_ENDPOINT_URL and try again")
