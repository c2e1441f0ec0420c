"""The object store: every MS, caltable, FITS image and context document.

All access goes through the minio client. Objects are immutable: a stage
writes new keys derived from (run, stage index, name) and records each with
its sha256, so a retried stage rewrites identical keys and nothing is lost.
Directories (an MS, a caltable) travel as uncompressed tar archives.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from datetime import timedelta

from minio import Minio
from minio.error import S3Error

from ..config import Config


class StoreError(RuntimeError):
    """The object store is unreachable or refused a request; the message says which."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ObjectStore:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        if not cfg.s3_secret_key:
            raise StoreError(f"no S3 credentials: set ALMAPIPE_S3_SECRET_KEY, or start a stack with "
                             f"`almapipe up` (it writes {cfg.data_dir}/credentials.json)")
        self.client = Minio(cfg.s3_endpoint, access_key=cfg.s3_access_key, secret_key=cfg.s3_secret_key,
                            secure=cfg.s3_secure)
        self.bucket = cfg.bucket
        self.raw_bucket = cfg.raw_bucket

    def ensure_buckets(self) -> None:
        try:
            for b in (self.bucket, self.raw_bucket):
                if not self.client.bucket_exists(b):
                    self.client.make_bucket(b)
        except Exception as exc:  # urllib3 connection errors, S3Error
            raise StoreError(f"object store at {self.cfg.s3_endpoint} unavailable: {exc}") from exc

    def ping(self) -> bool:
        try:
            self.client.list_buckets()
            return True
        except Exception:
            return False

    # --- files and directories
    def put_file(self, local: str, key: str, bucket: str | None = None, sha256: str | None = None) -> dict:
        """sha256: the file's, where the caller took it as it wrote the file."""
        digest = sha256 or sha256_file(local)
        size = os.path.getsize(local)
        self.client.fput_object(bucket or self.bucket, key, local, metadata={"x-amz-meta-sha256": digest})
        return {"key": key, "sha256": digest, "size": size}

    def put_dir(self, local_dir: str, key: str) -> dict:
        """Upload a directory (an MS, a caltable) as a tar archive at key."""
        with tempfile.TemporaryDirectory() as tmp:
            tar_path = os.path.join(tmp, "x.tar")
            with tarfile.open(tar_path, "w") as tar:
                tar.add(local_dir, arcname=os.path.basename(os.path.normpath(local_dir)))
            return self.put_file(tar_path, key)

    def get_file(self, key: str, local: str, bucket: str | None = None) -> str:
        try:
            self.client.fget_object(bucket or self.bucket, key, local)
        except S3Error as exc:
            raise StoreError(f"cannot fetch s3://{bucket or self.bucket}/{key}: {exc.code}") from exc
        return local

    def get_dir(self, key: str, dest_parent: str) -> str:
        """Fetch a tar archive and unpack it under dest_parent; returns the directory."""
        os.makedirs(dest_parent, exist_ok=True)
        tar_path = os.path.join(dest_parent, ".download.tar")
        self.get_file(key, tar_path)
        try:
            return unpack_dir(tar_path, dest_parent, key)
        finally:
            os.unlink(tar_path)

    # --- small documents
    def put_json(self, key: str, doc) -> dict:
        data = json.dumps(doc, indent=1, sort_keys=True, default=_json_default).encode()
        return self.put_bytes(key, data, "application/json")

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> dict:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    def get_bytes(self, key: str, bucket: str | None = None) -> bytes:
        return self.get_range(key, 0, 0, bucket)

    def get_range(self, key: str, offset: int, length: int, bucket: str | None = None) -> bytes:
        """Bytes [offset, offset + length) of an object (fewer at its end; length 0: to its end)."""
        try:
            resp = self.client.get_object(bucket or self.bucket, key, offset=offset, length=length)
        except S3Error as exc:
            raise StoreError(f"cannot fetch s3://{bucket or self.bucket}/{key}: {exc.code}") from exc
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key: str, bucket: str | None = None) -> bool:
        try:
            self.client.stat_object(bucket or self.bucket, key)
            return True
        except S3Error:
            return False

    def remove(self, key: str, bucket: str | None = None) -> None:
        try:
            self.client.remove_object(bucket or self.bucket, key)
        except S3Error as exc:
            raise StoreError(f"cannot remove s3://{bucket or self.bucket}/{key}: {exc.code}") from exc

    def list(self, prefix: str, bucket: str | None = None) -> list:
        return [o for o in self.client.list_objects(bucket or self.bucket, prefix=prefix, recursive=True)]

    def url(self, key: str, expiry_s: int = 3600) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expiry_s))


def unpack_dir(tar, dest_parent: str, what: str) -> str:
    """Unpack a tar archive of one directory (a path or an open binary file) under
    dest_parent, replacing a directory of that name; returns the directory."""
    with (tarfile.open(tar) if isinstance(tar, str) else tarfile.open(fileobj=tar)) as t:
        top = {m.name.split("/")[0] for m in t.getmembers()}
        if len(top) != 1:
            raise StoreError(f"{what}: archive must hold one directory, holds {sorted(top)[:5]}")
        dest = os.path.join(dest_parent, top.pop())
        if os.path.exists(dest):
            shutil.rmtree(dest)
        t.extractall(dest_parent, filter="data")
    return dest


class CachedFetcher:
    """Directories (caltables, MS shells) fetched once per worker: keys never change
    content. The tar archives they travel in are kept in a bounded cache (its share
    of ALMAPIPE_CACHE_MB, shared by the workers of a service); each stage execution
    unpacks its own private, writable copy."""

    def __init__(self, store: ObjectStore, cache_dir: str, limit: int | None = None):
        from ..config import CHUNK_CACHE_SHARE
        from .cache import BoundedCache
        self.store = store
        self.cache_dir = cache_dir
        if limit is None:
            limit = int(store.cfg.cache_bytes * (1 - CHUNK_CACHE_SHARE))
        os.makedirs(cache_dir, exist_ok=True)
        for e in os.scandir(cache_dir):
            if e.is_dir(follow_symlinks=False):
                # unpacked directories of the cache before it was bounded: not counted, so gone
                shutil.rmtree(e.path, ignore_errors=True)
        self.cache = BoundedCache(cache_dir, limit) if limit > 0 else None

    def dir(self, key: str, workdir: str) -> str:
        """A private, writable copy of the directory archived at key, inside workdir."""
        cached = self.cache.open(key) if self.cache is not None else None
        if cached is not None:
            with cached:
                return unpack_dir(cached, workdir, key)
        tar = os.path.join(workdir, f".{hashlib.sha1(key.encode()).hexdigest()}.tar")
        self.store.get_file(key, tar)
        try:
            if self.cache is not None:
                self.cache.put_file(key, tar)
            return unpack_dir(tar, workdir, key)
        finally:
            os.unlink(tar)

    def file(self, key: str, workdir: str, bucket: str | None = None) -> str:
        dest = os.path.join(workdir, os.path.basename(key))
        return self.store.get_file(key, dest, bucket)


def _json_default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
