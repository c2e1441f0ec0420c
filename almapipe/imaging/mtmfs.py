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
gain x sum_s a_s P_{t+s} subtracted from every R_t. Major cycles predict the model
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

from . import deconvolve, gridding

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
        self.wgridding = gridding.needs_wgridding(uvw, self.freq, 2 * npix, cell_rad)
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
def mt_hogbom(res, psfs, hinv, py, px, weight, gain, threshold, niter, models):
    """Multi-term Hogbom CLEAN, in place: res (nterms, ny, nx) the Taylor residuals,
    psfs (2 nterms - 1, 2 ny, 2 nx) with peak at (py, px), hinv the inverse Hessian,
    weight the search mask. Each iteration takes the pixel of largest a . R (a = H^-1 R
    there; the first in row-major order among equals) and stops when |R_0| x weight is
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
    big = np.ascontiguousarray(op.psfs(2 * npix))
    if big[0].max() <= 0:
        z = np.zeros((nt, npix, npix))
        return MTCleanResult(z, z.copy(), np.zeros((2 * nt - 1, npix, npix)), np.eye(nt), 0, 0, "no data")
    c = npix
    small = big[:, c - npix // 2:c + npix // 2, c - npix // 2:c + npix // 2]
    h = hessian(big, nt)
    hinv = np.linalg.inv(h)
    py, px = (int(v) for v in np.unravel_index(np.argmax(big[0]), big[0].shape))
    sidelobe = deconvolve._max_sidelobe(small[0])
    bmaj, bmin, _ = deconvolve.fit_beam(small[0], op.cell) if automask else (0.0, 0.0, 0.0)
    beam_pixels = np.pi / (4 * np.log(2)) * bmaj * bmin / (op.cell * 206264.806) ** 2
    models = np.zeros((nt, npix, npix))
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
        cycle_threshold = max(threshold_now, min(0.95, cyclefactor * sidelobe) * rmax)
        res = np.ascontiguousarray(res)          # cleaned in place
        n = mt_hogbom(res, big, hinv, py, px, np.ascontiguousarray(weight, np.float64), float(gain),
                      float(cycle_threshold), int(niter - done), models)
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
