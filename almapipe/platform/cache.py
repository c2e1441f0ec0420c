"""The worker cache: immutable objects on local disk, bounded in bytes.

A worker keeps what it read from S3 (visibility chunks, the tar archives of caltables
and MS shells) so that the next stage on the same data does not fetch it again. Every
key is immutable (decision 0015), so a cached object never goes stale; the only
question is how much to keep. ``BoundedCache`` holds at most ``limit`` bytes
(``Config.cache_bytes``, ALMAPIPE_CACHE_MB) and forgets the least recently used first,
but never for an object of the stage it is serving (``protect_since``): what a stage has
read or written since it began stays, and an object that finds no other room is not
kept. A stage's passes over a working set larger than the cache (makeimages reads a
target's spws once per image; a stage reads what the one before it wrote, in the same
order) would under plain LRU each evict what the next read needs, and hit nothing; kept
this way, the first part of the set stays and every later pass hits it. (Per process: a
stage that begins later in another process sharing the folder may evict what an earlier
one kept; nothing is lost but the later hits.)

Several processes share one cache folder: the workers of a service share its folder of
tar archives, and the workers of every service on a host share the folder of
visibility chunks (config.CHUNK_FOLDER). The bound holds for all of them together: the
bytes held are counted in one file (``.size``) that is only changed under an exclusive
lock on ``.lock`` (flock: the kernel releases it when a process dies, even killed), and
room is made and an object's bytes counted *before* it is written, also under the lock.
So at no moment does the folder hold more than ``limit`` bytes of objects and writes
under way, provided every process sharing it is given the same limit (one
ALMAPIPE_CACHE_MB for the host: a process with a smaller one trims the folder to its
own). The writing itself is outside the lock (into a temporary file named with the
count, renamed into place under the lock), so that the threads and processes filling
the cache write side by side. What a pass larger than the cache reads is not put here
at all (visstore.VisStore.keeps).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time

LOCK, SIZE, TMP = ".lock", ".size", ".tmp"
TMP_STALE_S = 120       # a temporary file not written to for this long is a killed writer's
EVICT_TO = 0.8          # an eviction makes room down to this part of the limit, not just enough
LARGEST_PART = 4        # an object over limit/LARGEST_PART is not kept (it would flush the rest)


class BoundedCache:
    """Objects by key in `directory`, at most `limit` bytes in all (least recently used go first)."""

    def __init__(self, directory: str, limit: int):
        self.dir, self.limit = directory, int(limit)
        os.makedirs(directory, exist_ok=True)
        self._thread_lock = threading.Lock()     # flock is per open file, not per thread
        # objects used at or after this time are not evicted (begin_stage); inf: plain LRU
        self.protect_since = float("inf")
        self._no_room_since = None   # the protect_since at which nothing was left to evict
        with self._locked():
            # recount: another version of the cache, a changed limit or a killed writer
            # (its temporary file) may have left the folder other than .size says
            self._write_size(self._evict(self.limit))

    def begin_stage(self) -> None:
        """A stage starts in this process: from now on, what it reads and writes is not
        evicted to make room for more of its own objects."""
        # the time as the file system stamps it (a coarse clock, behind time.time() by up
        # to a tick): an object used after this is never older than it
        stamp = os.path.join(self.dir, LOCK)
        with self._thread_lock:        # a previous stage's writes may still be under way
            with open(stamp, "a"):
                os.utime(stamp)
            self.protect_since = os.stat(stamp).st_mtime
            self._no_room_since = None

    # --- reading
    def _path(self, key: str) -> str:
        return os.path.join(self.dir, hashlib.sha1(key.encode()).hexdigest())

    def get(self, key: str) -> bytes | None:
        f = self.open(key)
        if f is None:
            return None
        with f:
            return f.read()

    def open(self, key: str):
        """The cached object as an open binary file, or None. An object evicted while open
        stays readable through the open file."""
        p = self._path(key)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(p)            # recently used: evicted last
        except FileNotFoundError:
            pass
        return f

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def held(self) -> int:
        """Bytes of objects in the folder now, and of writes under way (a scan; for tests
        and reports). Under the lock: a write is renamed into place under it, and a scan
        beside the rename could list neither the temporary name nor the final one."""
        with self._locked():
            return sum(size for _, size, _ in self._entries(sweep=False))

    # --- writing
    def put(self, key: str, data: bytes) -> None:
        """What was just written to S3 under key: replaces a cached copy. A stage may write
        a chunk of its own version more than once (two row ranges in one chunk), and a
        retried stage rewrites its keys."""
        def write(f):
            f.write(data)
        self._put(key, len(data), write, replace=True)

    def fill(self, key: str, data: bytes) -> None:
        """What was just read from S3 under key, unless the cache has the key already: a
        read that started before a write of the key must not put back the older bytes."""
        def write(f):
            f.write(data)
        self._put(key, len(data), write, replace=False)

    def discard(self, key: str) -> None:
        """Forget a cached copy of key (what was just written under key and not kept)."""
        p = self._path(key)
        if os.path.exists(p):
            with self._locked():
                self._drop(p)

    def put_file(self, key: str, path: str) -> None:
        """Keep a copy of a local file (a downloaded tar archive) under key."""
        def write(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        self._put(key, os.path.getsize(path), write, replace=False)

    def _put(self, key: str, nbytes: int, write, replace: bool) -> None:
        p = self._path(key)
        if nbytes > self.limit // LARGEST_PART:
            if replace:            # too large to keep: a cached older copy must not stay either
                with self._locked():
                    self._drop(p)
            return
        if not replace and os.path.exists(p):
            return
        # Room is made and the object's bytes counted under the lock; the bytes are written
        # outside it, into a temporary file named with that count, and renamed into place
        # under the lock again. Written under the lock, the fills of a stage's eight
        # fetching threads went one at a time: on a VM that backs each new page at its
        # first touch, a GB of new page-cache pages costs 1.5-3 CPU-s, which two threads
        # share (flagdata filled 4 GB, under half a core busy, on the realistic EB).
        with self._locked():
            if os.path.exists(p):
                if not replace:
                    return
                self._drop(p)      # readers meanwhile miss and read S3, which has the new bytes
            size, since = self._read_size(), self.protect_since
            if size + nbytes > self.limit:
                if self._no_room_since == since:
                    return         # still full of this stage's objects (no scan per object)
                size = self._evict(int(EVICT_TO * self.limit) - nbytes, before=since)
                if size + nbytes > self.limit:
                    # what is left is this stage's: keep it rather than this object
                    self._no_room_since = since
                    self._write_size(size)
                    return
            # created under the lock: a recount from the folder (_evict) by another writer
            # must see it, or the bytes counted for it would be lost from .size
            tmp = f"{p}.{os.getpid()}-{threading.get_ident()}.{nbytes}{TMP}"
            f = open(tmp, "wb")
            self._write_size(size + nbytes)
        try:
            with f:
                write(f)
        except BaseException:
            with self._locked():
                self._forget(tmp, nbytes)
            raise
        with self._locked():
            if not os.path.exists(tmp):    # swept as a killed writer's (TMP_STALE_S), with its count
                if replace:
                    self._drop(p)  # no older copy may stay in its place
                return
            if os.path.exists(p):
                if not replace:    # another thread or process filled it meanwhile
                    self._forget(tmp, nbytes)
                    return
                self._drop(p)      # a read that began before this write put back older bytes
            os.replace(tmp, p)

    def _forget(self, tmp: str, nbytes: int) -> None:
        """(Under the lock.) Delete a write's temporary file and its count, unless a
        recount swept both already."""
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            return
        self._write_size(max(0, self._read_size() - nbytes))

    # --- bookkeeping (under the lock)
    def _drop(self, path: str) -> None:
        try:
            size = os.path.getsize(path)
            os.unlink(path)
        except FileNotFoundError:
            return
        self._write_size(max(0, self._read_size() - size))

    @contextlib.contextmanager
    def _locked(self):
        with self._thread_lock, open(os.path.join(self.dir, LOCK), "a") as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _read_size(self) -> int:
        try:
            with open(os.path.join(self.dir, SIZE)) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return self._evict(self.limit)

    def _write_size(self, size: int) -> None:
        # in place, one write of a fixed width (under the lock; the count is read back
        # whole or not at all): a temporary file renamed over it cost 20x more, 5 s of
        # the calibrator's time as flagdata filled the cache (py-spy). A number left
        # wrong by a crash is recounted when a cache opens the folder (__init__).
        fd = os.open(os.path.join(self.dir, SIZE), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{size:020d}".encode(), 0)
        finally:
            os.close(fd)

    def _entries(self, sweep: bool = True) -> list:
        """(mtime, size, path) of the objects and of the writes under way (their temporary
        files, at the size counted for them, never evicted: mtime inf). `sweep` (under
        the lock only) deletes the temporary files of killed writers: those that have not
        been written to for TMP_STALE_S, or not named with their size."""
        out, now = [], time.time()
        for e in os.scandir(self.dir):
            if e.name.startswith("."):
                continue
            try:
                if e.name.endswith(TMP):
                    counted = _counted_size(e.name)
                    if counted is not None and e.stat().st_mtime > now - TMP_STALE_S:
                        out.append((float("inf"), counted, e.path))
                    elif sweep:
                        os.unlink(e.path)
                elif e.is_file():
                    st = e.stat()
                    out.append((st.st_mtime, st.st_size, e.path))
            except FileNotFoundError:
                pass
        return out

    def _evict(self, target: int, before: float = float("inf")) -> int:
        """Delete the least recently used objects last used before `before` until at
        most `target` bytes remain; returns the bytes that remain (counted from the
        folder, not from .size)."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        for mtime, size, path in entries:
            if total <= max(target, 0) or mtime >= before:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
        return total


def _counted_size(name: str) -> int | None:
    """The bytes counted for a write under way, from its temporary file's name
    (<object>.<pid>-<thread>.<bytes>.tmp); None for any other name."""
    parts = name[:-len(TMP)].split(".")
    return int(parts[2]) if len(parts) == 3 and "-" in parts[1] and parts[2].isdigit() else None
