"""Compiled minor-cycle loops of CLEAN (numba), after WSClean's sub-minor loop
(Offringa & Smirnov 2017, MNRAS 471, 301, sect. 2.2).

A minor cycle only ever picks pixels whose |residual| is above its threshold, so
the loops here work on a list of those candidate pixels (collected once per
sub-minor loop) instead of the whole image: finding the peak is a pass over the
list, and subtracting a component updates the residual only at the candidates,
with the full PSF (exact there, whatever its sidelobes). The rest of the image is
brought up to date once per sub-minor loop by the orchestration
(deconvolve.PsfConvolver: the PSF shifted onto a few components, or one FFT
convolution of many).

The candidates are kept as spans of consecutive pixels along rows (their values
contiguous, in row-major order; candidates a few pixels apart share a span), so
that where they are dense (a noise-like residual late in the cleaning can put half
the image above the threshold) the subtraction is a contiguous, vectorised pass as
over the whole image, and where they are sparse only the few spans are visited.
A long list's pass is split in chunks of spans over the threads (numba prange;
threads_for): every chunk subtracts the last component from its spans and finds
its own largest value, and the chunks' maxima are combined in order, so ties
resolve to the first candidate in row-major order, as np.argmax over the image
does.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import numba
import numpy as np

# what the passes may assume to vectorise their maxima (no NaNs or infinities,
# any order of a reduction), and not "contract": a fused multiply-add would round
# the subtraction differently from numpy's, and so could change which of two
# nearly equal pixels is the peak
FAST = {"nnan", "ninf", "nsz", "reassoc"}


@numba.njit(cache=True)
def spans(values, weight, threshold, gap):
    """The candidates of a sub-minor loop: the pixels where |values| x weight >=
    threshold, as spans along rows. Candidates of a row closer than gap pixels share
    a span, and the pixels between them ride along (kept up to date, and picked
    if they rise to be the peak: every pixel of a span is a candidate): a
    contiguous pass over a few more pixels costs less than starting another span,
    and fewer pixels are left outside to rise above the threshold unseen. Returns
    (span_y, span_x0, span_start, vals, w): span r covers pixels span_x0[r] + 0,
    1, ... of row span_y[r], whose values (copied) and weights are vals and w
    [span_start[r]:span_start[r + 1]]. A weight of shape (0, 0) means no weights
    (every pixel's is 1; w is then empty too)."""
    ny, nx = values.shape
    weighted = weight.shape[0] > 0
    one = weight.dtype.type(1)            # |values| x 1 in the precision of |values| x weight
    # first pass: count spans and their pixels
    nspan, npix = 0, 0
    for y in range(ny):
        last = -gap - 1
        for x in range(nx):
            if abs(values[y, x]) * (weight[y, x] if weighted else one) >= threshold:
                if x - last > gap:
                    nspan += 1
                    npix += 1
                else:
                    npix += x - last
                last = x
    span_y = np.empty(nspan, np.int64)
    span_x0 = np.empty(nspan, np.int64)
    span_start = np.empty(nspan + 1, np.int64)
    vals = np.empty(npix, values.dtype)
    w = np.zeros(npix if weighted else 0, values.dtype)
    r, j = -1, 0
    for y in range(ny):
        last = -gap - 1
        for x in range(nx):
            if abs(values[y, x]) * (weight[y, x] if weighted else one) >= threshold:
                if x - last > gap:
                    r += 1
                    span_y[r], span_x0[r], span_start[r] = y, x, j
                else:
                    for g in range(last + 1, x):       # the gap's pixels
                        vals[j] = values[y, g]
                        if weighted:
                            w[j] = weight[y, g]
                        j += 1
                vals[j] = values[y, x]
                if weighted:
                    w[j] = weight[y, x]
                j += 1
                last = x
    span_start[nspan] = npix
    return span_y, span_x0, span_start, vals, w


@numba.njit(cache=True)
def positions(span_y, span_x0, span_start, ks):
    """(y, x) of the span entries ks."""
    ys = np.empty(len(ks), np.int64)
    xs = np.empty(len(ks), np.int64)
    for i in range(len(ks)):
        r = np.searchsorted(span_start, ks[i], side="right") - 1
        ys[i] = span_y[r]
        xs[i] = span_x0[r] + ks[i] - span_start[r]
    return ys, xs


def prefer_threadsafe_layer() -> None:
    """Choose numba's OpenMP threading layer for this process where it loads (it needs
    the GNU OpenMP library, libgomp); call it before any parallel kernel runs. Two threads may then call parallel
    kernels at once (makeimages makes two images at once), which numba's default layer,
    workqueue, answers by aborting the process. NUMBA_THREADING_LAYER, when set, is the
    operator's choice and stays."""
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    try:        # the layer's own module: it loads only where libgomp does
        importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        return
    numba.config.THREADING_LAYER = "omp"


def threadsafe_layer() -> bool:
    """Whether threads of this process may call parallel kernels at the same time."""
    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:       # no parallel kernel has run yet: the layer is the one configured
        return numba.config.THREADING_LAYER in ("omp", "tbb", "threadsafe")


# a sub-minor loop's pass over fewer entries runs on one thread: the threads meet
# at every iteration, and on a shared machine one of them is often descheduled,
# so that a pass of a fraction of a millisecond waits for milliseconds (measured on
# the 2-core development machine under load: 2 threads 5-10x slower than one for
# 260k entries; unloaded, 1.6x faster from ~1M)
PARALLEL_MIN = 1 << 20


@contextmanager
def threads_for(n_entries: int, max_threads: int):
    """numba's threads for a sub-minor loop over n_entries (up to max_threads from
    PARALLEL_MIN, else one); yields the number."""
    before = numba.get_num_threads()
    nthreads = max(1, min(before, max_threads)) if n_entries >= PARALLEL_MIN else 1
    numba.set_num_threads(nthreads)
    try:
        yield nthreads
    finally:
        numba.set_num_threads(before)


def chunks(run_start: np.ndarray, nthreads: int) -> np.ndarray:
    """Boundaries (in spans) of chunks of about equal numbers of entries, a few per
    thread so that uneven spans still share out (one on one thread)."""
    n = int(run_start[-1])
    nchunk = 1 if nthreads == 1 else int(min(max(n // 4096, 1), 4 * nthreads, max(len(run_start) - 1, 1)))
    edges = np.searchsorted(run_start, np.arange(nchunk + 1) * n // nchunk)
    edges[-1] = len(run_start) - 1
    return np.unique(edges)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def hogbom_subminor(vals, w, run_y, run_x0, run_start, chunk, psf, py, px, gain, threshold, niter,
                    comp_k, comp_amp):
    """Hogbom CLEAN over candidate pixels, in place.

    vals (n,): the residual at the candidates (updated); w (n,): their search
    weights (the clean mask), the same dtype, or empty for none (one array less to
    stream through memory at every iteration); spans (run_y, run_x0, run_start) and
    chunk boundaries (chunks()); psf with its peak at (py, px), zero outside its
    array. Each iteration takes the candidate with the largest |vals| x w, stops if
    that is below threshold, records the component (its candidate index in comp_k,
    gain x value in comp_amp) and subtracts gain x value x the PSF centred on it
    from every candidate. Returns the number of components.

    The loops index the arrays directly (no row views, no helper functions taking
    arrays): a view per span costs reference counting that the threads contend
    for, 10x the time of the arithmetic."""
    nchunk = len(chunk) - 1
    pny, pnx = psf.shape
    best_v = np.empty(nchunk)
    best_k = np.empty(nchunk, np.int64)
    # the gain and the component in the residual's precision, as numpy computes them
    amp = np.zeros(1, vals.dtype)
    g = np.full(1, gain, vals.dtype)
    weighted = len(w) > 0
    one = w.dtype.type(1)
    # -1 in the precision of |vals| x w
    none = abs(vals[0]) * (w[0] if weighted else one) * 0 - 1
    yk, xk = 0, 0
    for it in range(niter + 1):
        a = amp[0]
        for ch in numba.prange(nchunk):
            bv, bk = none, -1
            for r in range(chunk[ch], chunk[ch + 1]):
                off = run_start[r]
                length = run_start[r + 1] - off
                iy = py + run_y[r] - yk
                ix0 = px + run_x0[r] - xk
                if it > 0 and 0 <= iy < pny:
                    # the span's entries that the PSF's row covers: [t0, t1), possibly none
                    t0 = min(max(0, -ix0), length)
                    t1 = max(min(length, pnx - ix0), t0)
                    for t in range(t0, t1):
                        vals[off + t] -= a * psf[iy, ix0 + t]
                m = none
                if weighted:
                    for t in range(length):
                        m = max(m, abs(vals[off + t]) * w[off + t])
                else:
                    for t in range(length):
                        m = max(m, abs(vals[off + t]))
                if m > bv:                    # only then: which entry it is
                    bv = m
                    for t in range(length):
                        # in the precision m was found in (an integer 1 would make it float64)
                        if abs(vals[off + t]) * (w[off + t] if weighted else one) == m:
                            bk = off + t
                            break
            best_v[ch] = bv
            best_k[ch] = bk
        k, v = -1, -1.0
        for ch in range(nchunk):
            if best_v[ch] > v:
                v, k = best_v[ch], best_k[ch]
        if it == niter or k < 0 or v < threshold:
            return it
        amp[0] = g[0] * vals[k]
        comp_amp[it] = amp[0]
        comp_k[it] = k
        r = np.searchsorted(run_start, k, side="right") - 1
        yk, xk = run_y[r], run_x0[r] + k - run_start[r]
    return niter


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def multiscale_subminor(vals, w, run_y, run_x0, run_start, run_scale, chunk, psf_st, py, px, gain, threshold,
                        factor, peak, niter, comp_k, comp_amp):
    """Multiscale CLEAN (Cornwell 2008) over candidate pixels of every scale, in place.

    vals (n,): each candidate's smoothed residual of its scale; spans as in
    hogbom_subminor, each of one scale (run_scale); psf_st (ns, ns, m, m): the
    PSF smoothed by scales s and t, peak at (py, px); factor (ns,): bias /
    sqrt(PSF_ss peak), the matched-filter weight that picks the scale; peak (ns,):
    PSF_ss at its centre. Each iteration finds every scale's largest |vals| x w,
    stops if none reaches threshold, takes the scale with the largest weighted
    value, records the component (candidate index, amplitude gain x value /
    PSF_ss peak) and subtracts its response PSF_st from every candidate of every
    scale t. Returns the number of components."""
    nchunk = len(chunk) - 1
    ns = psf_st.shape[0]
    pny, pnx = psf_st.shape[2], psf_st.shape[3]
    best_v = np.empty((nchunk, ns))
    best_k = np.empty((nchunk, ns), np.int64)
    none = abs(vals[0]) * w[0] * 0 - 1
    a = 0.0
    yk, xk, sk = 0, 0, 0
    for it in range(niter + 1):
        for ch in numba.prange(nchunk):
            for s in range(ns):
                best_v[ch, s] = -1.0
                best_k[ch, s] = -1
            for r in range(chunk[ch], chunk[ch + 1]):
                s = run_scale[r]
                off = run_start[r]
                length = run_start[r + 1] - off
                iy = py + run_y[r] - yk
                ix0 = px + run_x0[r] - xk
                if it > 0 and 0 <= iy < pny:
                    t0 = min(max(0, -ix0), length)
                    t1 = max(min(length, pnx - ix0), t0)
                    for t in range(t0, t1):
                        vals[off + t] -= a * psf_st[sk, s, iy, ix0 + t]
                m = none
                for t in range(length):
                    m = max(m, abs(vals[off + t]) * w[off + t])
                if m > best_v[ch, s]:
                    best_v[ch, s] = m
                    for t in range(length):
                        if abs(vals[off + t]) * w[off + t] == m:
                            best_k[ch, s] = off + t
                            break
        vmax = -1.0
        pick, pick_score = -1, -1.0
        for s in range(ns):
            v, k = -1.0, -1
            for ch in range(nchunk):
                if best_v[ch, s] > v:
                    v, k = best_v[ch, s], best_k[ch, s]
            if k < 0:
                continue
            vmax = max(vmax, v)
            if v * factor[s] > pick_score:
                pick, pick_score = k, v * factor[s]
        if it == niter or pick < 0 or vmax < threshold:
            return it
        r = np.searchsorted(run_start, pick, side="right") - 1
        sk = run_scale[r]
        a = gain * vals[pick] / peak[sk]
        comp_amp[it] = a
        comp_k[it] = pick
        yk, xk = run_y[r], run_x0[r] + pick - run_start[r]
    return niter


@numba.njit(parallel=True, cache=True)
def subtract_psf(image, psf, py, px, ys, xs, amps):
    """image -= amps[c] x the PSF (peak at (py, px), zero outside its array)
    centred on (ys[c], xs[c]), for every component c: direct, in parallel over rows
    (each row of the image stays in cache while the components pass over it)."""
    ny, nx = image.shape
    pny, pnx = psf.shape
    for y in numba.prange(ny):
        for c in range(len(ys)):
            iy = py + y - ys[c]
            if iy < 0 or iy >= pny:
                continue
            dx = px - xs[c]
            x0, x1 = max(0, -dx), min(nx, pnx - dx)
            a = amps[c]
            for x in range(x0, x1):
                image[y, x] -= a * psf[iy, x + dx]
