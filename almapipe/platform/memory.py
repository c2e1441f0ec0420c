"""The workers' heap: a stage's row blocks reuse the memory of the blocks before them.

A stage reads its visibilities in row blocks of up to 64 MiB (decoded chunks, gains,
binned samples), each allocated, used and freed before the next. glibc's malloc maps an
allocation above its mmap threshold (at most 32 MiB by default) afresh from the kernel
and unmaps it when it is freed, and a thread other than the main one allocates from an
arena of its own: so every block's every page was faulted in anew. On this project's
2-core VM a GB of fresh pages cost 0.1 to 2.4 CPU-s to fault in, against 0.06 s to
rewrite pages already held; decoding chunks into fresh blocks was the hottest line of
the imager and the calibrator in py-spy (30 CPU-s of a realistic EB's run).

tune_malloc() makes a worker's allocations come from one heap that keeps what it frees:
one arena for every thread (the read-ahead thread's blocks are freed by the stage's),
arrays up to MMAP_THRESHOLD taken from the heap, and up to TRIM_THRESHOLD of free memory
kept at its top. release() hands the free memory back to the kernel once a stage ends,
so that an idle worker holds only what it uses.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
# an array above this (a large image cube) is still mapped, and unmapped when freed
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 512 << 20

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
                    _libc = lib
            except OSError:
                pass
    return _libc


def tune_malloc() -> bool:
    """Set the heap up as the module says (ALMAPIPE_MALLOC_TUNING=0: leave glibc's
    defaults). Call it first thing in a process, before its threads start. Returns
    whether it was done (not on another C library)."""
    libc = _glibc()
    if not libc or os.environ.get("ALMAPIPE_MALLOC_TUNING", "1") == "0":
        return False
    done = all(libc.mallopt(option, ctypes.c_int(value)) == 1 for option, value in
               ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not done:
        log.warning("malloc tuning refused by the C library: row blocks are mapped afresh")
    return done


def release() -> None:
    """Hand the heap's free memory back to the kernel (malloc_trim), between stages."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(ctypes.c_size_t(0))
