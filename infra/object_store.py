"""Object store backends (source of truth): content-addressed sha256 blobs and version manifests, atomic writes.

Layout under the store root (a local directory or `s3://bucket/prefix`):
  blobs/<sha[:2]>/<sha>                 file contents, immutable, shared by every version that has them
  manifests/<adapter_id>/<version>.json version records (written after the registry accepts the version)
  manifests/<adapter_id>/tombstone.json soft-delete marker (the version it removed)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lorafleet.infra.errors import ConfigError, ObjectNotFound, StoreUnavailable

SHA256_HEX_LEN = 64


def blob_key(sha256: str) -> str:
    if len(sha256) != SHA256_HEX_LEN or not all(c in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"blobs/{sha256[:2]}/{sha256}"


def manifest_key(adapter_id: str, name: str) -> str:
    return f"manifests/{adapter_id}/{name}"


class ObjectStore(ABC):
    """Raw keyed objects (get/put/exists/delete/list) plus the content-addressed blob layer on top.

    Backends raise ObjectNotFound for a missing key and StoreUnavailable when the store cannot be reached.
    """

    url: str

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write `data` under `key` atomically: readers see the old object, no object, or all of `data`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is absent."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, sorted."""

    def put_blob(self, data: bytes) -> str:
        """Store `data` under its sha256 (hex) and return it. Always written, even if the key exists: that is
        what repairs a blob found corrupt, and readers of an atomic overwrite see the same bytes either way."""
        sha256 = hashlib.sha256(data).hexdigest()
        self.put(blob_key(sha256), data)
        return sha256

    def get_blob(self, sha256: str) -> bytes:
        """The blob's bytes as stored; the caller verifies the hash (a corrupt store must not go unnoticed)."""
        return self.get(blob_key(sha256))

    def delete_blob(self, sha256: str) -> None:
        self.delete(blob_key(sha256))


class LocalDirObjectStore(ObjectStore):
    """A directory tree; writes go to a temp file in the same directory, fsync, then rename (atomic on POSIX)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        assert all(p not in ("", ".", "..") for p in parts), f"bad object key {key!r}"
        return self.root.joinpath(*parts)

    def _unavailable(self, exc: OSError, what: str) -> StoreUnavailable:
        return StoreUnavailable(f"object store {self.url}: cannot {what} ({exc.__class__.__name__}: {exc})")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if not self.root.is_dir():
                raise StoreUnavailable(f"object store {self.url}: not a directory (missing or unmounted?)") from None
            raise ObjectNotFound(f"object store {self.url}: no object '{key}'") from None
        except OSError as exc:
            raise self._unavailable(exc, f"read '{key}'") from None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise self._unavailable(exc, f"write '{key}'") from None

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise self._unavailable(exc, f"stat '{key}'") from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._unavailable(exc, f"delete '{key}'") from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        start = base if base.is_dir() else base.parent
        try:
            found = [p.relative_to(self.root).as_posix() for p in start.rglob("*") if p.is_file()]
        except OSError as exc:
            raise self._unavailable(exc, f"list '{prefix}'") from None
        return sorted(k for k in found if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith(".tmp-"))


class S3ObjectStore(ObjectStore):
    """An S3-compatible bucket via boto3. A PutObject is atomic; the body's SHA-256 is sent so S3 rejects a
    truncated upload instead of storing it."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None,
        timeout_s: float = 5.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(
            connect_timeout=min(timeout_s, 2.0), read_timeout=timeout_s,
            retries={"max_attempts": 2, "mode": "standard"}, max_pool_connections=64,
        )
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _call(self, what: str, key: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"object store {self.url}: no object '{key}'") from None
            raise StoreUnavailable(f"object store {self.url}: cannot {what} '{key}' ({code}: {exc})") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(
                f"object store {self.url}: cannot {what} '{key}' ({exc.__class__.__name__}: {exc})"
            ) from None

    def get(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.client.get_object(
            Bucket=self.bucket, Key=self.prefix + key)["Body"].read())

    def put(self, key: str, data: bytes) -> None:
        import base64

        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        self._call("write", key, lambda: self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ChecksumSHA256=checksum))

    def exists(self, key: str) -> bool:
        try:
            self._call("stat", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self.prefix + key))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key))

    def list(self, prefix: str) -> list[str]:
        def pages() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                found += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
            return found

        return sorted(self._call("list", prefix, pages))


def _open_local(url: str, endpoint_url: str | None, timeout_s: float) -> ObjectStore:
    return LocalDirObjectStore(url[len("file://"):] if url.startswith("file://") else url)


def _open_s3(url: str, endpoint_url: str | None, timeout_s: float) -> ObjectStore:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ConfigError(f"store_url {url!r}: expected s3://bucket[/prefix]")
    return S3ObjectStore(parsed.netloc, parsed.path, endpoint_url=endpoint_url, timeout_s=timeout_s)


# URL scheme -> backend factory; a plain path is a local directory.
BACKENDS: dict[str, Callable[[str, str | None, float], ObjectStore]] = {
    "": _open_local, "file": _open_local, "s3": _open_s3,
}


def open_object_store(url: str, *, s3_endpoint_url: str | None = None, timeout_s: float = 5.0) -> ObjectStore:
    """The backend for `url`: a directory path / file://path, or s3://bucket/prefix (endpoint for S3-compatibles)."""
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme not in BACKENDS:
        raise ConfigError(f"store_url {url!r}: unknown scheme '{scheme}'; use a path, file:// or s3://")
    return BACKENDS[scheme](url, s3_endpoint_url, timeout_s)
