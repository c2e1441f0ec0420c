"""Gridding, weighting and degridding: thin wrappers over ducc0.wgridder.

Image arrays here are (ny, nx) in FITS order: x runs westward (RA decreasing,
CDELT1 < 0), y northward, and the phase centre is at pixel (nx//2, ny//2).
Visibilities follow the convention of CASA MeasurementSets as CASA's tclean
reads them, V = sum I exp(+2 pi i (u l + v m + w (n-1))) with the MS's UVW:
checked on NGC 5921, where our dirty image matches tclean's pixel for pixel.
With ducc0 that is flip_v and flip_w (ducc0's own sign is the opposite, and
its x axis runs with l, i.e. eastward, so u is flipped twice and not at all).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import ducc0

from . import kernels

EPSILON = 1e-5
FLIPS = {"flip_u": False, "flip_v": True, "flip_w": True}


_this_thread = threading.local()


def nthreads() -> int:
    """The threads a kernel called from this thread may use: ALMAPIPE_THREADS (default
    the cores), or fewer where the caller runs several such threads (threads_each)."""
    return getattr(_this_thread, "n", None) or int(os.environ.get("ALMAPIPE_THREADS", os.cpu_count() or 1))


@contextlib.contextmanager
def threads_each(n: int):
    """Within: kernels called from this thread use n threads (a thread among several)."""
    before = getattr(_this_thread, "n", None)
    _this_thread.n = max(1, int(n))
    try:
        yield
    finally:
        _this_thread.n = before


def side_by_side(fn, items: list, at_most: int | None = None) -> list:
    """[fn(item) for item in items]: as many at a time as this thread's kernels may use
    threads (nthreads(); at most at_most), each in a thread of its own whose kernels use
    one, for work that parallelises poorly inside (a small plane's gridding, a spw's
    passes of reading ahead and computing a block at a time). One after the other where
    that is one, or where numba's threading layer does not let threads call its parallel
    kernels at once. The first error is raised once the calls running end."""
    from concurrent.futures import ThreadPoolExecutor
    from .clean_kernels import threadsafe_layer
    at_once = min(nthreads(), len(items), at_most or len(items))
    if at_once < 2 or not threadsafe_layer():
        return [fn(item) for item in items]

    def one_thread(item):
        with threads_each(1):
            return fn(item)
    with ThreadPoolExecutor(at_once, thread_name_prefix="side-by-side") as pool:
        return list(pool.map(one_thread, items))


def briggs_weights(uvw: np.ndarray, freq: np.ndarray, weight: np.ndarray, npix: int, cell_rad: float,
                   robust: float | None) -> np.ndarray:
    """Imaging weights (nrow, nchan) from natural weights, Briggs-style (CASA's formula).

    weight is (nrow, nchan) with 0 where flagged. robust None means natural.
    The density is summed over all the channels given (mfs); call per channel
    for a cube with per-channel density.
    """
    if robust is None:
        return weight
    return kernels.briggs(np.ascontiguousarray(uvw[:, 0], np.float64), np.ascontiguousarray(uvw[:, 1], np.float64),
                          np.asarray(freq, np.float64) / 299792458.0, np.ascontiguousarray(weight), int(npix),
                          float(cell_rad), float(robust))


def _ascending(freq) -> np.ndarray:
    """Channel order that makes freq ascending, as ducc0 requires. About half of ALMA's
    spws are lower sideband, stored with frequencies descending: reversed, not sorted,
    when they are monotonic (no copy of the order array for the common cases)."""
    freq = np.asarray(freq, np.float64)
    if len(freq) < 2 or np.all(np.diff(freq) > 0):
        return slice(None)
    if np.all(np.diff(freq) < 0):
        return slice(None, None, -1)
    return np.argsort(freq, kind="stable")


def dirty(uvw, freq, vis, wgt, npix: int, cell_rad: float, wgridding: bool = True) -> np.ndarray:
    """Weighted dirty image (ny, nx), normalised by the sum of weights (Jy/beam)."""
    sw = float(wgt.sum())
    if sw <= 0:
        return np.zeros((npix, npix))
    order = _ascending(freq)
    freq, vis, wgt = np.asarray(freq)[order], vis[:, order], wgt[:, order]
    img = ducc0.wgridder.experimental.vis2dirty(
        uvw=np.ascontiguousarray(uvw, np.float64), freq=np.ascontiguousarray(freq, np.float64),
        vis=np.ascontiguousarray(vis, np.complex64), wgt=np.ascontiguousarray(wgt, np.float32),
        npix_x=npix, npix_y=npix, pixsize_x=cell_rad, pixsize_y=cell_rad, epsilon=EPSILON,
        do_wgridding=wgridding, nthreads=nthreads(), **FLIPS)
    return img.T / sw


def psf(uvw, freq, wgt, npix: int, cell_rad: float, wgridding: bool = True) -> np.ndarray:
    ones = np.ones(wgt.shape, np.complex64)
    return dirty(uvw, freq, ones, wgt, npix, cell_rad, wgridding)


def predict(uvw, freq, model: np.ndarray, cell_rad: float, wgridding: bool = True) -> np.ndarray:
    """Model visibilities (nrow, nchan) of a model image in Jy/pixel, (ny, nx), in the
    channel order of freq."""
    order = _ascending(freq)
    vis = ducc0.wgridder.experimental.dirty2vis(
        uvw=np.ascontiguousarray(uvw, np.float64), freq=np.ascontiguousarray(np.asarray(freq)[order], np.float64),
        dirty=np.ascontiguousarray(model.T, np.float32), pixsize_x=cell_rad, pixsize_y=cell_rad,
        epsilon=EPSILON, do_wgridding=wgridding, nthreads=nthreads(), **FLIPS)
    if isinstance(order, slice):
        return vis[:, order] if order.step == -1 else vis
    out = np.empty_like(vis)
    out[:, order] = vis
    return out


# the w-term's phase at the image's corner, for the largest |w|, above which the
# gridder corrects it. A corner source left uncorrected loses the mean of phase^2 / 2
# over its samples, at most 0.5 % at 0.1 rad (1.1e-3 in tests/test_imaging.py). On
# the long-baseline preset at 4096^2 (0.074 rad) a source near the corner kept
# 99.97 % of its peak, while w-gridding made each grid and degrid 3.4x slower.
# CASA's tclean corrects no single ALMA field (gridder 'standard').
WTERM_TOLERANCE_RAD = 0.1


def needs_wgridding(uvw: np.ndarray, freq: np.ndarray, npix: int, cell_rad: float,
                    tol_rad: float = WTERM_TOLERANCE_RAD) -> bool:
    """Whether the w-term matters on an npix grid: its phase at the grid's corner,
    pi w (l^2 + m^2) for the largest |w| in wavelengths, above tol_rad. A compact
    ALMA array at 230 GHz imaging its primary beam does not need it (milliradians);
    the VLA at 1.4 GHz imaging its primary beam does (radians). Without it the
    gridder is faster."""
    if not len(uvw):
        return False
    w_max = float(np.abs(uvw[:, 2]).max()) * float(np.max(freq)) / 299792458.0
    corner2 = 2 * (npix / 2 * cell_rad) ** 2
    return bool(np.pi * w_max * corner2 > tol_rad)


def good_size(n: int) -> int:
    """The next size >= n that is even and fast for FFTs."""
    m = int(ducc0.fft.good_size(int(n), True))
    return m + (m % 2)
