"""Multi-term multi-frequency synthesis (MT-MFS; Rau & Cornwell 2011, A&A 532, A71):
the deconvolver tclean calls 'mtmfs', for continuum images over a wide band.

The sky's spectrum at each pixel is a Taylor polynomial in x = (nu - nu0) / nu0,

    I(nu) = sum_t I_t x^t,        t = 0 .. nterms - 1,

so that with nterms = 2 a power law I0 (nu / nu0)^alpha is I_0 = I0, I_1 = alpha I0
to first order. The data are gridded nterms times with the weights multiplied by x^t
(the Taylor-weighted dirty images R_t) and 2 nterms - 1 times for the Taylor-weighted
PSFs P_k (k = 0 .. 2 nterms - 2), all normalised by the sum of the weights, so that
P_0 is the usual PSF with peak 1. A point component of coefficients a_s at a pixel
adds sum_s a_s P_{t+s} (shifted) to R_t; the Hessian H_ts = P_{t+s}(0) couples the
terms at the component's own pixel.

The minor cycle (Hogbom, one scale): at each pixel the coefficients that best explain
the residuals there are a = H^-1 R; the component is taken where the decrease of the
chi-square it brings, a . R, is largest, gain x a is added to the models and
gain x sum_s a_s P_{t+s} subtracted from every R_t, over a list of the pixels that
can be picked (the sub-minor loop of decisions 8 and 17: the whole residuals are
brought up to date once a list is done). Major cycles predict the model
visibilities as sum_t x^t V(I_t) (each Taylor model degridded once) and grid the
residual visibilities again, so the minor cycle's approximations do not accumulate.

The restored images (tt_t) are each model convolved with the restoring beam (fitted
to P_0) plus the residuals converted to Taylor coefficients, H^-1 R at every pixel
(the 'principal solution', as tclean restores multi-term images); the spectral index
is alpha = tt1 / tt0 where tt0 is bright enough, with its error propagated from
the noise of the two residual images.

Samples carry their own frequency (`nu`, broadcastable to (nrow, nchan)): the
aggregate continuum grids every channel bin at one reference frequency with its uvw
scaled (imager.aggregate_samples), so the frequency the Taylor weights need is the
bin's, not the gridder's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from . import clean_kernels, deconvolve, fourier, gridding

# tclean's default: two terms, a flux and a spectral index
NTERMS = 2
# the ALMA pipeline images the aggregate continuum with nterms = 2 above this
# fractional bandwidth ((nu_max - nu_min) / nu_centre of the channels imaged)
FRACTIONAL_BANDWIDTH_NTERMS2 = 0.10


def fractional_bandwidth(lo_hz: float, hi_hz: float) -> float:
    return float((hi_hz - lo_hz) / (0.5 * (hi_hz + lo_hz))) if hi_hz > lo_hz else 0.0


def nterms_for(lo_hz: float, hi_hz: float, nterms: int | None = None) -> int:
    """The ALMA pipeline's choice: 2 terms when the band imaged is wider than 10 %
    of its centre frequency, else 1; an explicit nterms wins."""
    if nterms is not None:
        return int(nterms)
    return NTERMS if fractional_bandwidth(lo_hz, hi_hz) > FRACTIONAL_BANDWIDTH_NTERMS2 else 1


class TaylorPointing:
    """One pointing's samples and image grid, imaged in Taylor terms.

    uvw (nrow, 3) m; freq (nchan,) the gridder's frequencies; vis, wgt (nrow, nchan)
    with wgt the imaging weights; nu the samples' own frequencies, broadcastable to
    (nrow, nchan); nu0 the reference frequency."""

    def __init__(self, uvw, freq, vis, wgt, nu, nu0: float, npix: int, cell_rad: float, nterms: int = NTERMS):
        self.uvw, self.freq, self.vis, self.wgt = uvw, np.asarray(freq, float), vis, wgt
        self.x = np.broadcast_to((np.asarray(nu, float) - nu0) / nu0, vis.shape).astype(np.float32)
        self.nu0, self.npix, self.cell, self.nterms = float(nu0), npix, cell_rad, int(nterms)
        self.wgridding = gridding.needs_wgridding(uvw, self.freq, deconvolve.minor_cycle_psf_size(npix), cell_rad)
        self.sum_w = float(wgt.sum())

    def _image(self, vis, npix: int) -> np.ndarray:
        """sum w V / sum w on an npix grid: every image here shares the one normalisation."""
        return gridding.dirty(self.uvw, self.freq, vis, self.wgt, npix, self.cell, self.wgridding)

    def psfs(self, npix: int) -> np.ndarray:
        """The Taylor-weighted PSFs P_k, k = 0 .. 2 nterms - 2, (2 nterms - 1, npix, npix),
        scaled so that P_0's peak is 1."""
        out = np.array([self._image((self.x ** k).astype(np.complex64), npix) for k in range(2 * self.nterms - 1)])
        peak = out[0].max()
        return out / peak if peak > 0 else out

    def dirty(self) -> np.ndarray:
        """The Taylor-weighted dirty images R_t, (nterms, npix, npix)."""
        return self._residuals(self.vis)

    def _residuals(self, vis) -> np.ndarray:
        return np.array([self._image(vis * self.x ** t, self.npix) for t in range(self.nterms)])

    def residual(self, models: np.ndarray) -> np.ndarray:
        """R_t of the data less the model sum_t x^t I_t (models (nterms, ny, nx), Jy/pixel)."""
        model_vis = np.zeros(self.vis.shape, np.complex64)
        for t, m in enumerate(models):
            if m.any():
                model_vis += gridding.predict(self.uvw, self.freq, m, self.cell, self.wgridding) * self.x ** t
        return self._residuals(self.vis - model_vis)


def hessian(psfs: np.ndarray, nterms: int) -> np.ndarray:
    """H_ts = P_{t+s} at the PSF's peak."""
    c = np.unravel_index(np.argmax(psfs[0]), psfs[0].shape)
    return np.array([[psfs[t + s][c] for s in range(nterms)] for t in range(nterms)], float)


@numba.njit(cache=True)
def _mt_scan_pixel(res, hinv, y, x, nt):
    """a . R = R^T H^-1 R at one pixel: the decrease of chi-square its component brings."""
    crit = 0.0
    for i in range(nt):
        ai = 0.0
        for j in range(nt):
            ai += hinv[i, j] * res[j, y, x]
        crit += ai * res[i, y, x]
    return crit


@numba.njit(cache=True)
def mt_hogbom_whole_image(res, psfs, hinv, py, px, weight, gain, threshold, niter, models):
    """Multi-term Hogbom CLEAN over the whole image, in place (the reference that
    mt_hogbom's sub-minor loop is checked against): res (nterms, ny, nx) the Taylor
    residuals, psfs (2 nterms - 1, 2 ny, 2 nx) with peak at (py, px) (twice the image: no
    bounds are checked), hinv the inverse Hessian, weight the search mask. Each
    iteration takes the pixel of largest a . R (a = H^-1 R there; the first in
    row-major order among equals) and stops when |R_0| x weight is
    below threshold everywhere or after niter components. Returns the number of
    components.

    The search for the next component rides along the subtraction of the last one: one
    pass over the image per component instead of two (the whole image: every pixel
    changes)."""
    nt, ny, nx = res.shape
    a = np.zeros(nt)
    best, by, bx, peak0 = -1.0, -1, -1, 0.0
    for y in range(ny):
        for x in range(nx):
            w = weight[y, x]
            if w <= 0:
                continue
            r0 = abs(res[0, y, x]) * w
            if r0 > peak0:
                peak0 = r0
            crit = _mt_scan_pixel(res, hinv, y, x, nt) * w
            if crit > best:
                best, by, bx = crit, y, x
    done = 0
    while done < niter:
        if by < 0 or peak0 < threshold:
            break
        for i in range(nt):
            ai = 0.0
            for j in range(nt):
                ai += hinv[i, j] * res[j, by, bx]
            a[i] = gain * ai
            models[i, by, bx] += a[i]
        oy, ox = py - by, px - bx
        best, by, bx, peak0 = -1.0, -1, -1, 0.0
        for y in range(ny):
            for x in range(nx):
                for t in range(nt):
                    s = 0.0
                    for j in range(nt):
                        s += a[j] * psfs[t + j, y + oy, x + ox]
                    res[t, y, x] -= s
                w = weight[y, x]
                if w <= 0:
                    continue
                r0 = abs(res[0, y, x]) * w
                if r0 > peak0:
                    peak0 = r0
                crit = _mt_scan_pixel(res, hinv, y, x, nt) * w
                if crit > best:
                    best, by, bx = crit, y, x
        done += 1
    return done


# candidates of a row closer than this share a span; the list holds the pixels within
# this fraction of the threshold; a list of more than this fraction of the image
# becomes the whole image (as the single-term Hogbom's, decision 8)
SPAN_GAP = deconvolve.SPAN_GAP
SPAN_MARGIN = deconvolve.SPAN_MARGIN
DENSE_FRACTION = deconvolve.DENSE_FRACTION


@numba.njit(parallel=True, cache=True)
def mt_candidates(res, weight, hinv, r0_threshold, crit_threshold):
    """1 where |R_0| x weight >= r0_threshold or (a . R) x weight >= crit_threshold, else 0."""
    nt, ny, nx = res.shape
    out = np.zeros((ny, nx), np.float32)
    for y in numba.prange(ny):
        for x in range(nx):
            w = weight[y, x]
            if w <= 0:
                continue
            if abs(res[0, y, x]) * w >= r0_threshold or _mt_scan_pixel(res, hinv, y, x, nt) * w >= crit_threshold:
                out[y, x] = 1.0
    return out


@numba.njit(cache=True)
def gather(images, span_y, span_x0, span_start):
    """The images' values (k, ny, nx) at the spans' pixels, (k, n)."""
    out = np.empty((images.shape[0], span_start[-1]), images.dtype)
    for r in range(len(span_y)):
        off = span_start[r]
        for e in range(span_start[r + 1] - off):
            for t in range(images.shape[0]):
                out[t, off + e] = images[t, span_y[r], span_x0[r] + e]
    return out


@numba.njit(cache=True)
def _join_chunks(best_c, best_k, peak0):
    """The threads' chunks joined: the entry of the largest criterion (the first chunk's
    among equals, as one pass in order would pick) and the largest |R_0| x weight."""
    k, c, p0 = -1, -1.0, 0.0
    for ch in range(len(best_c)):
        if best_c[ch] > c:
            c, k = best_c[ch], best_k[ch]
        if peak0[ch] > p0:
            p0 = peak0[ch]
    return k, p0


@numba.njit(parallel=True, cache=True)
def mt_subminor(vals, w, run_y, run_x0, run_start, chunk, psfs, py, px, hinv, gain, threshold, niter,
                comp_k, comp_amp):
    """Multi-term Hogbom CLEAN over candidate pixels, in place: mt_hogbom_whole_image's
    iteration with the image replaced by the list.

    vals (nterms, n): every R_t at the candidates (updated); w (n,) their search
    weights; spans (run_y, run_x0, run_start) and chunk boundaries as
    clean_kernels.hogbom_subminor's; psfs (2 nterms - 1, my, mx) with P_0's peak at
    (py, px). Each iteration subtracts the last component's sum_s a_s P_{t+s} from
    every R_t at every candidate, takes the candidate of largest (a . R) x w (the
    first in row-major order among equals), stops if the largest |R_0| x w among the
    candidates is below threshold, and records the component (candidate index in
    comp_k, gain x H^-1 R there in comp_amp (niter, nterms)). Returns the number of
    components. The arithmetic is the whole-image pass's, term for term (no
    fastmath), so that over a list of every pixel the components are the same."""
    nt = vals.shape[0]
    nchunk = len(chunk) - 1
    pny, pnx = psfs.shape[1], psfs.shape[2]
    best_c = np.empty(nchunk)
    best_k = np.empty(nchunk, np.int64)
    peak0 = np.empty(nchunk)
    a = np.zeros(nt)
    yk, xk = 0, 0
    for it in range(niter + 1):
        for ch in numba.prange(nchunk):
            bc, bk, p0 = -1.0, -1, 0.0
            for r in range(chunk[ch], chunk[ch + 1]):
                off = run_start[r]
                length = run_start[r + 1] - off
                iy = py + run_y[r] - yk
                ix0 = px + run_x0[r] - xk
                if it > 0 and 0 <= iy < pny:
                    # the span's entries that the PSFs' row covers: [e0, e1), possibly none
                    e0 = min(max(0, -ix0), length)
                    e1 = max(min(length, pnx - ix0), e0)
                    for t in range(nt):
                        for e in range(e0, e1):
                            s = 0.0
                            for j in range(nt):
                                s += a[j] * psfs[t + j, iy, ix0 + e]
                            vals[t, off + e] -= s
                for e in range(length):
                    we = w[off + e]
                    if we <= 0:
                        continue
                    r0 = abs(vals[0, off + e]) * we
                    if r0 > p0:
                        p0 = r0
                    crit = 0.0
                    for i in range(nt):
                        ai = 0.0
                        for j in range(nt):
                            ai += hinv[i, j] * vals[j, off + e]
                        crit += ai * vals[i, off + e]
                    crit *= we
                    if crit > bc:
                        bc, bk = crit, off + e
            best_c[ch] = bc
            best_k[ch] = bk
            peak0[ch] = p0
        k, p0 = _join_chunks(best_c, best_k, peak0)
        if it == niter or k < 0 or p0 < threshold:
            return it
        for i in range(nt):
            ai = 0.0
            for j in range(nt):
                ai += hinv[i, j] * vals[j, k]
            a[i] = gain * ai
            comp_amp[it, i] = a[i]
        comp_k[it] = k
        r = np.searchsorted(run_start, k, side="right") - 1
        yk, xk = run_y[r], run_x0[r] + k - run_start[r]
    return niter


@numba.njit(parallel=True, cache=True)
def mt2_subminor(vals, w, run_y, run_x0, run_start, chunk, psfs, py, px, hinv, gain, threshold, niter,
                 comp_k, comp_amp):
    """mt_subminor for two terms (the one case of the pipeline), 2.3x as fast (8.6
    against 20 ms an iteration over 1M candidates, one thread): the terms'
    coefficients and the inverse Hessian in scalars, every term's residual a row of its
    own, the subtraction and the search each one pass. The arithmetic is still
    mt_hogbom_whole_image's, term for term: s = 0 + a_0 P_t + a_1 P_{t+1} is
    a_0 P_t + a_1 P_{t+1}, and so on (no fastmath: reassociating changed the
    components' rounding). Each span's largest criterion is found first, kept in
    crit, and its first entry looked up only if it beats the chunk's best."""
    n = vals.shape[1]
    nchunk = len(chunk) - 1
    pny, pnx = psfs.shape[1], psfs.shape[2]
    best_c = np.empty(nchunk)
    best_k = np.empty(nchunk, np.int64)
    peak0 = np.empty(nchunk)
    crit = np.empty(n)
    h00, h01, h10, h11 = hinv[0, 0], hinv[0, 1], hinv[1, 0], hinv[1, 1]
    r0s, r1s = vals[0], vals[1]
    p0s, p1s, p2s = psfs[0], psfs[1], psfs[2]
    a0, a1 = 0.0, 0.0
    yk, xk = 0, 0
    for it in range(niter + 1):
        for ch in numba.prange(nchunk):
            bc, bk, p0 = -1.0, -1, 0.0
            for r in range(chunk[ch], chunk[ch + 1]):
                off = run_start[r]
                end = run_start[r + 1]
                iy = py + run_y[r] - yk
                dx = px + run_x0[r] - xk - off          # the PSFs' column of entry k is k + dx
                if it > 0 and 0 <= iy < pny:
                    # the span's entries that the PSFs' row covers: [e0, e1), possibly none
                    e0 = min(max(off, -dx), end)
                    e1 = max(min(end, pnx - dx), e0)
                    for k in range(e0, e1):
                        q0 = p0s[iy, k + dx]
                        q1 = p1s[iy, k + dx]
                        q2 = p2s[iy, k + dx]
                        r0s[k] -= a0 * q0 + a1 * q1
                        r1s[k] -= a0 * q1 + a1 * q2
                m0, m = 0.0, -1.0
                for k in range(off, end):
                    x0 = r0s[k]
                    x1 = r1s[k]
                    wk = w[k]
                    m0 = max(m0, abs(x0) * wk)
                    c = ((h00 * x0 + h01 * x1) * x0 + (h10 * x0 + h11 * x1) * x1) * wk
                    c = c if wk > 0 else -1.0           # outside the mask: never picked
                    crit[k] = c
                    m = max(m, c)
                p0 = max(p0, m0)
                if m > bc:
                    bc = m
                    for k in range(off, end):
                        if crit[k] == m:
                            bk = k
                            break
            best_c[ch] = bc
            best_k[ch] = bk
            peak0[ch] = p0
        k, p0 = _join_chunks(best_c, best_k, peak0)
        if it == niter or k < 0 or p0 < threshold:
            return it
        a0 = gain * (h00 * r0s[k] + h01 * r1s[k])
        a1 = gain * (h10 * r0s[k] + h11 * r1s[k])
        comp_amp[it, 0] = a0
        comp_amp[it, 1] = a1
        comp_k[it] = k
        r = np.searchsorted(run_start, k, side="right") - 1
        yk, xk = run_y[r], run_x0[r] + k - run_start[r]
    return niter


@numba.njit(parallel=True, cache=True)
def subtract_taylor_psfs(res, psfs, py, px, ys, xs, amps):
    """res[t] -= sum_s amps[c, s] x P_{t+s} centred on (ys[c], xs[c]) for every
    component c: directly, in parallel over rows."""
    nt, ny, nx = res.shape
    pny, pnx = psfs.shape[1], psfs.shape[2]
    for y in numba.prange(ny):
        for c in range(len(ys)):
            iy = py + y - ys[c]
            if iy < 0 or iy >= pny:
                continue
            dx = px - xs[c]
            x0, x1 = max(0, -dx), min(nx, pnx - dx)
            for t in range(nt):
                for x in range(x0, x1):
                    s = 0.0
                    for j in range(nt):
                        s += amps[c, j] * psfs[t + j, iy, x + dx]
                    res[t, y, x] -= s


class TaylorPsfConvolver:
    """Subtracts multi-term components (coefficients a_s at pixels) convolved with the
    Taylor PSFs from every R_t over the whole image, as deconvolve.PsfConvolver does
    for one term: directly for a few distinct pixels (subtract_taylor_psfs), else by
    FFT on a grid where nothing wraps into the image, with the 2 nterms - 1 PSFs'
    transforms computed once and reused by every sub-minor loop and major cycle
    (nterms forward and nterms inverse transforms a loop)."""

    def __init__(self, psfs: np.ndarray, shape: tuple):
        self.psfs = psfs
        self.shape = shape
        self.py, self.px = (int(v) for v in np.unravel_index(np.argmax(psfs[0]), psfs[0].shape))
        self._ft = None
        self.grid = deconvolve.convolution_grid(psfs.shape[1:], shape, (self.py, self.px))

    def subtract(self, res: np.ndarray, ys: np.ndarray, xs: np.ndarray, amps: np.ndarray) -> None:
        """res (nterms, ny, nx) -= the components (ys, xs, amps (n, nterms)) x the PSFs."""
        if not len(amps):
            return
        nt = res.shape[0]
        uy, ux, total = deconvolve.merge_components(ys, xs, amps, self.shape[1])
        gy, gx = self.grid
        # direct: nterms^2 passes over the image per pixel; FFT: 2 nterms transforms
        # of the grid (the single-term crossover, deconvolve.PsfConvolver, per term)
        if len(uy) * nt * res[0].size <= 0.5 * gy * gx * np.log2(gy * gx):
            subtract_taylor_psfs(res, self.psfs, self.py, self.px, uy, ux, total)
            return
        real = np.float32 if res.dtype == np.float32 else np.float64
        if self._ft is None:
            self._ft = [deconvolve.psf_transform(p, self.grid, (self.py, self.px), real) for p in self.psfs]
        comp_ft = []
        for s in range(nt):
            comps = np.zeros(self.grid, real)
            comps[uy, ux] = total[:, s]
            comp_ft.append(fourier.rfft2(comps))
        for t in range(nt):
            spec = sum(comp_ft[s] * self._ft[t + s] for s in range(nt))
            conv = fourier.irfft2(spec, self.grid, overwrite=True)
            res[t] -= conv[:self.shape[0], :self.shape[1]].astype(res.dtype, copy=False)


def mt_hogbom(res, psfs, hinv, py, px, weight, gain, threshold, niter, models, convolver=None,
              margin: float = SPAN_MARGIN) -> int:
    """Multi-term Hogbom CLEAN, in place: res (nterms, ny, nx) the Taylor residuals,
    psfs (2 nterms - 1, m, m) with peak at (py, px), the image's size or larger
    (deconvolve.minor_cycle_psf_size), hinv the inverse Hessian,
    weight the search mask. Takes the pixel of largest (a . R) x weight (a = H^-1 R
    there) and stops when |R_0| x weight is below threshold everywhere or after niter
    components, as mt_hogbom_whole_image. Returns the number of components.

    The sub-minor loop of decision 8: the candidates are the pixels where
    |R_0| x weight >= margin x threshold or where (a . R) x weight could reach the
    criterion that the pixel of largest |R_0| x weight (>= threshold while the loop
    runs) has at least, lambda_min(H^-1) x threshold^2 (for weights <= 1; margin^2
    of it); every R_t is held for them only (mt2_subminor, mt_subminor). Afterwards the whole of
    every R_t is brought up to date (convolver) and, while a pixel is above the
    threshold, the loop starts again from a new list. A list of more than
    DENSE_FRACTION of the image becomes the whole image: then the components are the
    whole-image search's. Over a sparse list they are too, unless a pixel outside
    it rises to be the pick before the list runs out (it is then taken later)."""
    nt, ny, nx = res.shape
    convolver = convolver or TaylorPsfConvolver(psfs, (ny, nx))
    weight = np.ascontiguousarray(weight, np.float64)
    wmax = max(float(weight.max()), 1.0) if weight.size else 1.0
    lam_min = float(np.linalg.eigvalsh(0.5 * (hinv + hinv.T)).min())
    r0_threshold = margin * threshold
    crit_threshold = margin ** 2 * max(lam_min, 0.0) * threshold ** 2 / wmax
    ones = np.ones((ny, nx), np.float32)
    done = 0
    while done < niter:
        listed = mt_candidates(res, weight, hinv, r0_threshold, crit_threshold)
        if listed.sum() > DENSE_FRACTION * listed.size:
            # most of the image anyway: take all of it, and no pixel is left outside
            # to rise unseen (exactly the whole-image search, at about the same cost)
            listed[:] = 1.0
        run_y, run_x0, run_start, _, _ = clean_kernels.spans(listed, ones, 0.5, SPAN_GAP)
        if not len(run_y):
            break
        wv = gather(weight[None], run_y, run_x0, run_start)[0]
        vals = gather(res, run_y, run_x0, run_start)
        comp_k = np.zeros(niter - done, np.int64)
        comp_amp = np.zeros((niter - done, nt))
        subminor = mt2_subminor if nt == 2 else mt_subminor
        with clean_kernels.threads_for(len(wv), gridding.nthreads()) as nthreads:
            n = subminor(vals, wv, run_y, run_x0, run_start, clean_kernels.chunks(run_start, nthreads),
                         psfs, py, px, hinv, float(gain), float(threshold), niter - done, comp_k, comp_amp)
        ys, xs = clean_kernels.positions(run_y, run_x0, run_start, comp_k[:n])
        for t in range(nt):
            np.add.at(models[t], (ys, xs), comp_amp[:n, t])
        convolver.subtract(res, ys, xs, comp_amp[:n])
        done += n
        if n == 0:
            break
    return done


@dataclass
class MTCleanResult:
    models: np.ndarray      # (nterms, ny, nx) Jy/pixel, Taylor coefficients
    residuals: np.ndarray   # (nterms, ny, nx) the Taylor-weighted residuals R_t
    psfs: np.ndarray        # (2 nterms - 1, ny, nx), P_0's peak 1
    hessian: np.ndarray
    iterations: int
    major_cycles: int
    stop_reason: str
    mask: np.ndarray | None = None


def clean_mt(op: TaylorPointing, niter: int, threshold: float, gain: float = 0.1, cyclefactor: float = 1.5,
             max_major: int = 20, nsigma: float = 0.0, automask: bool = False, threshold_from_dirty=None,
             automask_params=None) -> MTCleanResult:
    """Major/minor-cycle multi-term CLEAN of one plane, as deconvolve.clean is for one
    term: thresholds, the cycle threshold and automasking act on R_0 (the tt0
    residual, in Jy/beam), as tclean's do."""
    npix, nt = op.npix, op.nterms
    big = np.ascontiguousarray(op.psfs(deconvolve.minor_cycle_psf_size(npix)))
    if big[0].max() <= 0:
        z = np.zeros((nt, npix, npix))
        return MTCleanResult(z, z.copy(), np.zeros((2 * nt - 1, npix, npix)), np.eye(nt), 0, 0, "no data")
    c = big.shape[1] // 2
    small = big[:, c - npix // 2:c + npix // 2, c - npix // 2:c + npix // 2]
    h = hessian(big, nt)
    hinv = np.linalg.inv(h)
    py, px = (int(v) for v in np.unravel_index(np.argmax(big[0]), big[0].shape))
    sidelobe = deconvolve._max_sidelobe(small[0])
    bmaj, bmin, _ = deconvolve.fit_beam(small[0], op.cell) if automask else (0.0, 0.0, 0.0)
    beam_pixels = np.pi / (4 * np.log(2)) * bmaj * bmin / (op.cell * 206264.806) ** 2
    models = np.zeros((nt, npix, npix))
    convolver = TaylorPsfConvolver(big, (npix, npix))
    res = op.dirty()
    if threshold_from_dirty is not None:
        threshold = float(threshold_from_dirty(float(np.abs(res[0]).max())))
    mask = None
    done, major, reason = 0, 0, "niter reached"
    while done < niter and major < max_major:
        if automask:
            from .automask import AutomaskParams, update_mask
            mask = update_mask(res[0], mask, sidelobe, beam_pixels, automask_params or AutomaskParams()).astype(float)
            if not mask.any():
                reason = "automask found no emission"
                break
        weight = np.ones((npix, npix)) if mask is None else mask
        threshold_now = max(threshold, nsigma * deconvolve.robust_rms(res[0]))
        rmax = float(np.abs(res[0] * weight).max())
        if rmax < threshold_now:
            reason = "threshold reached"
            break
        stop_at = deconvolve.cycle_threshold(threshold_now, rmax, sidelobe, cyclefactor)
        res = np.ascontiguousarray(res)          # cleaned in place
        n = mt_hogbom(res, big, hinv, py, px, np.ascontiguousarray(weight, np.float64), float(gain),
                      float(stop_at), int(niter - done), models, convolver)
        done += n
        major += 1
        res = op.residual(models)
        if n == 0:
            reason = "threshold reached"
            break
    else:
        if major >= max_major:
            reason = "major cycle limit"
    return MTCleanResult(models, res, small, h, done, major, reason, mask)


def principal_solution(residuals: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The residuals as Taylor coefficients, H^-1 R at every pixel (nterms, ny, nx)."""
    return np.einsum("ts,syx->tyx", np.linalg.inv(h), residuals)


@dataclass
class TaylorImages:
    """The products of an mtmfs image (ALMA's .tt0, .tt1, .alpha, .alpha.error)."""
    tt: np.ndarray           # (nterms, ny, nx) restored Taylor coefficients, Jy/beam
    residual: np.ndarray     # (nterms, ny, nx) principal-solution residuals
    model: np.ndarray        # (nterms, ny, nx)
    alpha: np.ndarray        # (ny, nx), NaN where tt0 is below the alpha threshold
    alpha_error: np.ndarray  # (ny, nx), NaN where alpha is
    alpha_threshold: float   # Jy/beam of tt0 above which alpha is given
    rms: np.ndarray          # (nterms,) robust rms of the residuals


# alpha is given where tt0 exceeds this many times its residual rms and this
# fraction of its peak (a spectral index from a faint pixel is noise)
ALPHA_NSIGMA = 5.0
ALPHA_PEAK_FRACTION = 0.01


def restore_taylor(models: np.ndarray, residuals: np.ndarray, h: np.ndarray, cell_rad: float, beam: tuple,
                   inside: np.ndarray | None = None, nsigma: float = ALPHA_NSIGMA,
                   peak_fraction: float = ALPHA_PEAK_FRACTION) -> TaylorImages:
    """Restored tt images, alpha = tt1 / tt0 and its error. inside: where the noise
    and peak are measured (the primary beam above its limit); the error is
    sigma_alpha = sqrt(s1^2 + alpha^2 s0^2) / tt0 with s_t the robust rms of the
    principal residual t (first-order propagation of tt1 / tt0)."""
    resid = principal_solution(residuals, h)
    tt = np.array([deconvolve.restore(m, r, cell_rad, beam) if beam[0] > 0 else r.copy()
                   for m, r in zip(models, resid)])
    sel = np.ones(tt[0].shape, bool) if inside is None else inside
    rms = np.array([deconvolve.robust_rms(r[sel]) for r in resid])
    nan = np.full(tt[0].shape, np.nan)
    if len(tt) < 2:
        return TaylorImages(tt, resid, models, nan, nan.copy(), np.inf, rms)
    peak = float(np.nanmax(np.where(sel, tt[0], -np.inf))) if sel.any() else 0.0
    thr = max(nsigma * rms[0], peak_fraction * peak)
    good = sel & (tt[0] > thr)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(good, tt[1] / tt[0], np.nan)
        err = np.where(good, np.sqrt(rms[1] ** 2 + alpha ** 2 * rms[0] ** 2) / tt[0], np.nan)
    return TaylorImages(tt, resid, models, alpha, err, thr, rms)
