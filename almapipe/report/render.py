"""A stage's figures rendered to PNG in a helper process, beside the stage's computing.

Why: drawing a WebLog figure with matplotlib's Agg backend is Python that holds the
GIL (an antenna grid of 43 panels takes 2-4 s), and the calibration stages draw one or
two per spw: on the realistic EB about 40 % of the calibrator's time went to drawing.
A stage builds its figure, hands it over pickled, and goes on with its next spw while
one helper process (per worker process, started on first use) draws it on the other
core. ``StageIO.plot`` hands figures over; the stage's wrapper (``stages.base.stage``)
waits for them and uploads the PNGs before the stage's result is written, so a stage
still ends with its plots in S3.

A figure that cannot be pickled, or a helper that died, is drawn in the stage's own
thread instead: the WebLog never loses a plot to the helper. ALMAPIPE_PLOT_PROCESSES=0
draws everything in the stage's thread (the least memory).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_LOCK = threading.Lock()
_POOL: ProcessPoolExecutor | None = None


def helper_processes() -> int:
    return max(0, int(os.environ.get("ALMAPIPE_PLOT_PROCESSES", "1")))


def draw(fig, path: str, savefig: dict) -> str:
    """Save a figure (or a report.panels.PanelGrid, drawn here) as PNG at path and forget
    it (in whichever process holds it)."""
    import matplotlib.pyplot as plt
    if hasattr(fig, "to_figure"):
        fig.savefig(path, **savefig)
        return path
    try:
        fig.savefig(path, **savefig)
    finally:
        plt.close(fig)
    return path


def _draw_pickled(blob: bytes, path: str, savefig: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    return draw(pickle.loads(blob), path, savefig)


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            # spawn, not fork: a worker process has threads (NATS, zarr's event loop)
            _POOL = ProcessPoolExecutor(helper_processes(), mp_context=multiprocessing.get_context("spawn"))
        return _POOL


def _forget_pool(pool: ProcessPoolExecutor) -> None:
    global _POOL
    with _LOCK:
        if _POOL is pool:
            _POOL = None
    pool.shutdown(wait=False, cancel_futures=True)


class Pending:
    """A figure on its way to a PNG file; ``wait`` returns the file's path once drawn."""

    def __init__(self, path: str, savefig: dict, blob: bytes | None = None, future: Future | None = None,
                 pool: ProcessPoolExecutor | None = None):
        self.path, self.savefig, self.blob, self.future, self.pool = path, savefig, blob, future, pool

    def wait(self) -> str:
        if self.future is None:
            return self.path
        try:
            return self.future.result()
        except BrokenProcessPool:
            # the helper died (killed, out of memory): draw it here, and start a new
            # helper for the next figure
            _forget_pool(self.pool)
            return _draw_pickled(self.blob, self.path, self.savefig)

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()


def submit(fig, path: str, **savefig) -> Pending:
    """Hand a figure over to be saved as a PNG at path; the figure is closed here."""
    if helper_processes() == 0:
        return Pending(draw(fig, path, savefig), savefig)
    try:
        blob = pickle.dumps(fig)
    except Exception:       # a figure holding something unpicklable (a lambda formatter)
        return Pending(draw(fig, path, savefig), savefig)
    if not hasattr(fig, "to_figure"):
        import matplotlib.pyplot as plt
        plt.close(fig)
    pool = _pool()
    try:
        return Pending(path, savefig, blob, pool.submit(_draw_pickled, blob, path, savefig), pool)
    except (BrokenProcessPool, RuntimeError):        # a helper that died before this figure
        _forget_pool(pool)
        return Pending(_draw_pickled(blob, path, savefig), savefig)


class Beside:
    """fn(*args) computed in the helper process while the caller goes on; ``result``
    returns its value, computed here instead when the helper is off or died, or when fn
    and its arguments cannot be pickled (a test's stand-in function)."""

    def __init__(self, fn, args: tuple):
        self.fn, self.args, self.future, self.pool = fn, args, None, None
        if helper_processes() == 0:
            return
        try:
            blob = pickle.dumps((fn, args))
        except Exception:
            return
        self.pool = _pool()
        try:
            self.future = self.pool.submit(_call_pickled, blob)
        except (BrokenProcessPool, RuntimeError):
            _forget_pool(self.pool)

    def result(self):
        if self.future is None:
            return self.fn(*self.args)
        try:
            return self.future.result()
        except BrokenProcessPool:
            _forget_pool(self.pool)
            return self.fn(*self.args)


def _call_pickled(blob: bytes):
    import matplotlib
    matplotlib.use("Agg")
    fn, args = pickle.loads(blob)
    return fn(*args)
