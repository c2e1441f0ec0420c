"""The object store: every MS, caltable, FITS image and context document.

All access goes through the minio client. Objects are immutable: a stage
writes new keys derived from (run, stage index, name) and records each with
its sha256, so a retried stage rewrites identical keys and nothing is lost.
Directories (an MS, a caltable) travel as uncompressed tar archives. The visibility
chunks (visstore) and uploads (the gateway) go through obstore (s3_object_store).
"""
from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

from minio import Minio
from minio.commonconfig import ComposeSource
from minio.error import S3Error

from ..config import Config


class StoreError(RuntimeError):
    """The object store is unreachable or refused a request; the message says which."""


# S3's smallest part of a multipart upload but the last (AWS, MinIO and SeaweedFS alike):
# a part copied by the server (UploadPartCopy) must be at least this long; its largest
# part, and the most parts an object has
MIN_PART_BYTES = 5 * 2**20
MAX_PART_BYTES = 5 * 2**30
MAX_PARTS = 10000
# a Repeat's unit: its data as many times as fill this many bytes (a unit is one
# UploadPartCopy request; what does not fill one is uploaded)
REPEAT_UNIT_BYTES = 16 * 2**20
# bytes taken from a stream or an object at a time (hashing, uploading)
STREAM_BYTES = 8 * 2**20
PUT_PART_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Range:
    """Bytes [offset, offset + length) of an object already in the store: a segment of
    ObjectStore.assemble. data: those bytes, where this process has them (hashed
    without fetching them)."""
    key: str
    offset: int
    length: int
    data: bytes | None = None


@dataclass(frozen=True)
class Stream:
    """A segment of ObjectStore.assemble made here: length bytes, as chunks."""
    chunks: Iterable
    length: int


@dataclass(frozen=True)
class Repeat:
    """A segment of ObjectStore.assemble: data, times over (a FITS cube's plane that is
    the same in every channel: a primary beam, an empty plane). Stored once as a unit of
    REPEAT_UNIT_BYTES, copied by the server as often as it goes."""
    data: bytes
    times: int


class ChunkReader:
    """A file-like object over chunks of bytes (minio's put_object reads a part at a
    time from it), each chunk hashed on its way (where a digest is given). A part is
    joined once from views of the chunks: no byte is copied twice."""

    def __init__(self, chunks: Iterable, digest=None):
        self.chunks, self.digest = iter(chunks), digest
        self.buf, self.pos = memoryview(b""), 0

    def read(self, n: int = -1) -> bytes:
        out = []
        while n != 0:
            if self.pos >= len(self.buf):
                chunk = next(self.chunks, None)
                if chunk is None:
                    break
                self.buf, self.pos = memoryview(chunk).cast("B"), 0
                if self.digest is not None:
                    self.digest.update(self.buf)
                continue
            take = len(self.buf) - self.pos if n < 0 else min(n, len(self.buf) - self.pos)
            out.append(self.buf[self.pos:self.pos + take])
            self.pos += take
            n = n - take if n > 0 else n
        return b"".join(out)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def loopback(endpoint: str) -> bool:
    """Whether host:port names this machine (a request to it never leaves the host)."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:          # a name other than localhost: resolved elsewhere, not trusted
        return False


def s3_object_store(cfg: Config, bucket: str):
    """An obstore S3 store on one bucket. A request's body is hashed into its signature
    only where nothing else guards it: over TLS, and to a server on this machine, the
    signature covers the headers (UNSIGNED-PAYLOAD, as AWS's SDKs send over TLS) and the
    body is not hashed (0.5 s of CPU per GB written, measured)."""
    from obstore.store import S3Store
    scheme = "https" if cfg.s3_secure else "http"
    return S3Store(bucket, endpoint=f"{scheme}://{cfg.s3_endpoint}", access_key_id=cfg.s3_access_key,
                   secret_access_key=cfg.s3_secret_key, region="us-east-1",
                   virtual_hosted_style_request=False, client_options={"allow_http": not cfg.s3_secure},
                   unsigned_payload=cfg.s3_secure or loopback(cfg.s3_endpoint))


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

    def put_stream(self, key: str, chunks: Iterable, length: int, metadata: dict | None = None,
                   hashed: bool = True) -> dict:
        """An object of length bytes given as chunks (memory: a few parts of
        PUT_PART_BYTES, not the object); its entry carries their sha256, taken on the
        way (none where not hashed)."""
        digest = hashlib.sha256() if hashed else None
        reader = ChunkReader(chunks, digest)
        # parts of PUT_PART_BYTES: what the uploader holds at a time
        self.client.put_object(self.bucket, key, reader, length, metadata=metadata, part_size=PUT_PART_BYTES)
        if reader.read(1):
            raise StoreError(f"put_stream {key}: more than the {length} bytes announced")
        return {"key": key, "sha256": digest.hexdigest() if hashed else None, "size": length}

    def chunks(self, key: str, offset: int = 0, length: int = 0, bucket: str | None = None):
        """The bytes [offset, offset + length) of an object (length 0: to its end), a
        few MB at a time."""
        try:
            resp = self.client.get_object(bucket or self.bucket, key, offset=offset, length=length)
        except S3Error as exc:
            raise StoreError(f"cannot fetch s3://{bucket or self.bucket}/{key}: {exc.code}") from exc
        try:
            yield from resp.stream(STREAM_BYTES)
        finally:
            resp.close()
            resp.release_conn()

    def assemble(self, key: str, segments: list) -> dict:
        """One object made of segments, in order: bytes (or a Stream) from this process,
        Ranges of objects already in the store, Repeats. Where a Range is at least
        MIN_PART_BYTES the server copies it into place (a multipart upload's
        UploadPartCopy): its bytes do not pass through this process but to be hashed. The
        rest is uploaded as parts of their own (each at least MIN_PART_BYTES but the
        last, taking from Ranges what they lack), composed, then removed. A cube's pieces
        store their planes, and its join assembles the FITS files from them.

        The entry and the object's metadata carry the whole object's sha256, as
        put_file's do; the entry's "copied" counts the bytes the server copied. The
        sha256 goes with the upload's first request, so the copied ranges are read back
        to hash them before anything is composed. Temporary objects are named per call:
        two calls for the same key at once (a redelivered stage) do not share them."""
        digest = hashlib.sha256()
        token = uuid.uuid4().hex[:8]
        temps: list = []
        try:
            parts = _parts(self._expand(f"{key}.{token}", segments, temps))
            count = sum(-(-(_length(p) if isinstance(p, Range) else sum(map(_length, p))) // MAX_PART_BYTES)
                        for p in parts)
            if count > MAX_PARTS:
                raise StoreError(f"cannot assemble s3://{self.bucket}/{key}: {count} parts, more than S3's "
                                 f"{MAX_PARTS}")
            sources, size, copied = [], 0, 0
            for i, part in enumerate(parts):
                if isinstance(part, Range):
                    got = 0
                    for chunk in _range_chunks(self, part):
                        digest.update(chunk)
                        got += len(chunk)
                    if got != part.length:
                        raise StoreError(f"assemble {key}: s3://{self.bucket}/{part.key} gave {got} of the "
                                         f"{part.length} bytes from {part.offset}")
                    sources += _sources(self.bucket, part.key, part.offset, part.length)
                    size += part.length
                    copied += part.length
                    continue
                tmp = f"{key}.{token}.part{i}"
                length = sum(_length(s) for s in part)
                temps.append(tmp)
                self.put_stream(tmp, _segment_chunks(self, part, digest), length, hashed=False)
                sources += _sources(self.bucket, tmp, 0, length)
                size += length
            sha = digest.hexdigest()
            try:
                self.client.compose_object(self.bucket, key, sources, metadata={"x-amz-meta-sha256": sha})
            except (S3Error, ValueError) as exc:
                raise StoreError(f"cannot assemble s3://{self.bucket}/{key} from {len(sources)} parts: "
                                 f"{getattr(exc, 'code', exc)}") from exc
            return {"key": key, "sha256": sha, "size": size, "copied": copied}
        finally:
            for tmp in temps:
                try:
                    self.client.remove_object(self.bucket, tmp)
                except Exception:         # a temporary part left behind is retention's to drop
                    pass

    def _expand(self, prefix: str, segments: list, temps: list) -> list:
        """segments with each Repeat made Ranges of a unit stored once (at
        prefix.unitN; one for the Repeats of the same data) and the bytes that do not
        fill a unit."""
        out, units = [], {}
        for seg in segments:
            if not isinstance(seg, Repeat):
                out.append(seg)
                continue
            per_unit = -(-REPEAT_UNIT_BYTES // max(len(seg.data), 1))
            if seg.times < 2 * per_unit:         # too few to gain from copies
                out.append(Stream([seg.data] * seg.times, len(seg.data) * seg.times))
                continue
            if seg.data not in units:
                units[seg.data] = (f"{prefix}.unit{len(units)}", seg.data * per_unit)
                temps.append(units[seg.data][0])
                self.put_bytes(*units[seg.data])
            unit_key, unit = units[seg.data]
            out += [Range(unit_key, 0, len(unit), data=unit)] * (seg.times // per_unit)
            if seg.times % per_unit:
                out.append(Stream([seg.data] * (seg.times % per_unit), len(seg.data) * (seg.times % per_unit)))
        return out

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
        return b"".join(self.chunks(key, offset, length, bucket))

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


def _length(seg) -> int:
    return seg.length if isinstance(seg, (Range, Stream)) else memoryview(seg).nbytes


def _sources(bucket: str, key: str, offset: int, length: int) -> list:
    """What compose_object copies of bytes [offset, offset + length) of an object: one
    source, or as many equal ones as keep each within MAX_PART_BYTES (minio would cut a
    longer one into 5 GiB parts and a remainder that may be shorter than S3 allows)."""
    n = -(-length // MAX_PART_BYTES)
    if n <= 1:
        return [ComposeSource(bucket, key, offset=offset, length=length)]
    edges = [offset + length * k // n for k in range(n + 1)]
    return [ComposeSource(bucket, key, offset=a, length=b - a) for a, b in zip(edges[:-1], edges[1:])]


def _parts(segments: list) -> list:
    """ObjectStore.assemble's parts: a Range of at least MIN_PART_BYTES alone (copied by
    the server), else a list of segments uploaded together. A part to upload takes the
    segments after it until it is MIN_PART_BYTES long (only the last part may be
    shorter), so a short header or a short piece never stands between two copies; from a
    long range it takes only what it lacks."""
    parts: list = []
    held = 0                            # the bytes of the last part, where it is one to upload
    for seg in segments:
        length = _length(seg)
        if length == 0:
            continue
        last = parts[-1] if parts and isinstance(parts[-1], list) else None
        short = MIN_PART_BYTES - held if last is not None else 0
        if short > 0 and isinstance(seg, Range) and length - short >= MIN_PART_BYTES:
            # the part takes what it lacks of a long range, the server copies the rest
            cut = lambda a, b: seg.data[a:b] if seg.data is not None else None  # noqa: E731
            last.append(Range(seg.key, seg.offset, short, cut(0, short)))
            parts.append(Range(seg.key, seg.offset + short, length - short, cut(short, length)))
        elif short <= 0 and isinstance(seg, Range) and length >= MIN_PART_BYTES:
            parts.append(seg)
        elif last is not None:
            last.append(seg)
            held += length
        else:
            parts.append([seg])
            held = length
    return parts


def _range_chunks(store: "ObjectStore", seg: Range):
    """A Range's bytes: those this process has, else fetched."""
    return [seg.data] if seg.data is not None else store.chunks(seg.key, seg.offset, seg.length)


def _segment_chunks(store: "ObjectStore", part: list, digest):
    """The bytes of a part to upload, in chunks, hashed into digest on the way (the
    uploader reads them through a ChunkReader without a digest of its own)."""
    for seg in part:
        if isinstance(seg, Range):
            chunks = _range_chunks(store, seg)
        elif isinstance(seg, Stream):
            chunks = seg.chunks
        else:
            chunks = [seg]
        for chunk in chunks:
            digest.update(chunk)
            yield chunk


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

    def __init__(self, store: ObjectStore, cache_dir: str, limit: int | None = None, chunk_dir: str | None = None):
        """chunk_dir: the folder of the visibility chunks' cache, which the stages' VisStore
        uses (StageIO.vstore). A worker passes its host's, shared by every service; the
        default, cache_dir's name + "-chunks", keeps a test's or a bench's fetcher apart."""
        from ..config import CHUNK_CACHE_SHARE
        from .cache import BoundedCache
        self.store = store
        self.cache_dir = cache_dir
        self.chunk_dir = chunk_dir or cache_dir.rstrip("/") + "-chunks"
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
