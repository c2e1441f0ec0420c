"""The host's chunk cache filled in the workers' idle time (decision 0023).

Whichever stage first reads an EB's visibilities pays for fetching them from S3 and
writing them into the host's chunk cache: on the realistic EB about 4 CPU-s per GB
(the client's read and the cache's new pages, the S3 server's answer), 16 CPU-s in all.
flagdata used to pay it (it read every visibility to find the zeros), and once it read
only the rows importdata found zeros in, flagtargets paid it instead: the run took as
long. Meanwhile the calibration stages between them keep 1.0-1.4 of the machine's two
cores busy for half a minute.

So a worker that is handed a stage reading the partitions starts one background process,
at the lowest CPU priority, that fetches into the chunk cache every chunk of the
partitions' VISIBILITY arrays not yet there: on an idle core it costs the stages
nothing, and the stages that read the data later find them in the cache. It warms only
an EB whose visibilities fit in three quarters of the chunk cache (a larger one would
evict what the stages keep, as VisStore.keeps explains), once per run and version (one
worker of a host at a time), and stops when the worker is handed a stage of another
run. `ALMAPIPE_CACHE_WARMING=0` turns it off.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading

log = logging.getLogger("almapipe.warmup")

WARM_SHARE = 0.75        # the most of the chunk cache that warming fills
REMEMBERED = 32          # the (run, arrays) a worker remembers having warmed


def enabled() -> bool:
    return os.environ.get("ALMAPIPE_CACHE_WARMING", "1") != "0"


def visibility_arrays(ctx: dict) -> tuple[list, int]:
    """The VISIBILITY arrays of the context's partitions and their bytes (complex64)."""
    keys, nbytes = [], 0
    for p in ctx.get("partitions") or []:
        key = (p.get("arrays") or {}).get("VISIBILITY")
        if key and key not in keys:
            keys.append(key)
            nbytes += int(p.get("nrow", 0)) * int(p.get("nchan", 0)) * int(p.get("ncorr", 0)) * 8
    return keys, nbytes


class CacheWarmer:
    """One warming process per worker process (`start` for each stage it is handed).

    A process, not a thread: a thread of the worker at nice 19 that holds the GIL when
    the scheduler passes it over holds up the stage's own thread (flagdata took 14 s
    beside a warming thread, 8 s alone). Of the workers of a host, one warms a run's
    visibilities at a time: the warming process holds a lock file named after them in
    the chunk cache's folder, and another that finds it taken ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._run = None                   # the run whose visibilities are being warmed
        self._started = collections.OrderedDict()    # (run, arrays) warmed or being warmed
        self.process = None

    def start(self, vstore, cfg, ctx: dict, run_id: str) -> bool:
        """For each stage this worker is handed (`ctx` without partitions for a stage
        that reads none): stop warming another run's visibilities, and warm these unless
        they are being or have been warmed, do not fit, or there is no cache. Returns
        whether a warming process started."""
        with self._lock:
            if self._run is not None and self._run != run_id:
                self._stop()               # another run's: no longer wanted
            keys, nbytes = visibility_arrays(ctx)
            if not enabled() or not keys or vstore.cache is None or nbytes > WARM_SHARE * vstore.cache_limit:
                return False
            want = (run_id, tuple(keys))
            if want in self._started:
                return False
            self._stop()                   # another version's
            self._started[want] = True
            while len(self._started) > REMEMBERED:
                self._started.popitem(last=False)
            import multiprocessing
            self.process = multiprocessing.get_context("spawn").Process(
                target=_warm, args=(cfg, vstore.cache.dir, vstore.cache_limit, keys, run_id, os.getpid()),
                name="cache-warm", daemon=True)
            self.process.start()
            self._run = run_id
            return True

    def _stop(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()       # a fill cut short leaves a temporary file, swept later
        self.process, self._run = None, None


def _warm(cfg, cache_dir: str, cache_limit: int, keys: list, run_id: str, parent: int) -> None:
    """The warming process: lowest priority; one per host and set of arrays (a lock file
    in the cache's folder); it stops when its worker is gone."""
    import fcntl
    import hashlib
    from .visstore import VisStore
    os.nice(19)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s warmup %(levelname)s %(name)s: %(message)s")
    path = os.path.join(cache_dir, f".warm-{hashlib.sha1(chr(10).join(keys).encode()).hexdigest()}")
    with open(path, "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return                         # another worker of the host warms them
        try:
            vstore = VisStore(cfg, cache_dir=cache_dir, cache_limit=cache_limit)
            fetched = vstore.warm(keys, lambda: os.getppid() != parent)
            log.info("run %s: %.2f GB of visibilities fetched into the chunk cache in idle time", run_id,
                     fetched / 1e9)
        except Exception as exc:           # a warming that fails costs the stages their hits, nothing else
            log.warning("run %s: warming the chunk cache stopped: %s", run_id, exc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)            # (one left by a killed warming is an empty file)
