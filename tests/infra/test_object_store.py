"""Object store backends: local directory and a real S3 server (moto): content addressing, atomic writes, errors."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from lorafleet.infra.errors import ConfigError, ObjectNotFound, StoreUnavailable
from lorafleet.infra.object_store import LocalDirObjectStore, S3ObjectStore, blob_key, open_object_store


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    if request.param == "local":
        return LocalDirObjectStore(tmp_path / "objects")
    return request.getfixturevalue("s3_server").object_store()


def test_blobs_are_content_addressed(objects):
    data = os.urandom(70_000)
    sha = objects.put_blob(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert objects.put_blob(data) == sha  # idempotent
    assert objects.get_blob(sha) == data
    assert objects.exists(blob_key(sha))
    assert objects.list("blobs/") == [blob_key(sha)]
    objects.delete_blob(sha)
    objects.delete_blob(sha)  # absent: no error
    with pytest.raises(ObjectNotFound, match="no object"):
        objects.get_blob(sha)


def test_keys_list_and_overwrite(objects):
    objects.put("manifests/a/0000000001.json", b"one")
    objects.put("manifests/a/0000000002.json", b"two")
    objects.put("manifests/ab/0000000001.json", b"x")
    objects.put("manifests/a/0000000001.json", b"uno")
    assert objects.get("manifests/a/0000000001.json") == b"uno"
    assert objects.list("manifests/a/") == ["manifests/a/0000000001.json", "manifests/a/0000000002.json"]
    assert len(objects.list("manifests/")) == 3
    assert objects.list("manifests/zzz/") == []
    assert not objects.exists("manifests/zzz/1.json")


def test_blob_key_rejects_non_digests():
    for bad in ("../" * 20 + "etc", "A" * 64, "0" * 63):
        with pytest.raises(ValueError):
            blob_key(bad)


def test_local_writes_are_atomic(tmp_path):
    """Readers racing a rewrite see the old or the new bytes in full, never a prefix; temp files stay hidden."""
    objects = LocalDirObjectStore(tmp_path)
    blobs = [bytes([i]) * (4 << 20) for i in range(2)]
    objects.put("k/obj", blobs[0])
    stop = threading.Event()
    seen: set[int] = set()

    def read() -> None:
        while not stop.is_set():
            data = objects.get("k/obj")
            assert data in blobs, f"torn read of {len(data)} bytes"
            seen.add(data[0])

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        objects.put("k/obj", blobs[i % 2])
    stop.set()
    reader.join()
    assert seen
    (tmp_path / "k" / ".tmp-obj-crashed").write_bytes(b"partial")  # what a crash mid-write leaves
    assert objects.list("k/") == ["k/obj"]


def test_local_store_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    objects = LocalDirObjectStore(blocker / "store")  # a path under a regular file: unusable
    with pytest.raises(StoreUnavailable, match="cannot write"):
        objects.put_blob(b"data")
    with pytest.raises(StoreUnavailable):
        objects.get_blob(hashlib.sha256(b"data").hexdigest())


def test_s3_down_is_store_unavailable(private_s3_server):
    objects = private_s3_server.object_store()
    sha = objects.put_blob(b"hello")
    private_s3_server.stop()
    with pytest.raises(StoreUnavailable, match="s3://"):
        objects.get_blob(sha)
    with pytest.raises(StoreUnavailable):
        objects.put_blob(b"other")
    private_s3_server.start()
    assert objects.get_blob(sha) == b"hello"


def test_s3_missing_bucket_is_unavailable(s3_server):
    objects = S3ObjectStore("no-such-bucket", "p", endpoint_url=s3_server.endpoint, client=s3_server.client())
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        objects.put_blob(b"x")


def test_open_object_store_by_url(tmp_path):
    assert isinstance(open_object_store(str(tmp_path)), LocalDirObjectStore)
    assert open_object_store(f"file://{tmp_path}").root == tmp_path
    s3 = open_object_store("s3://bucket/some/prefix", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3ObjectStore) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ConfigError, match="unknown scheme 'gs'"):
        open_object_store("gs://bucket")
    with pytest.raises(ConfigError, match="expected s3://bucket"):
        open_object_store("s3:///x")
