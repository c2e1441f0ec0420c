"""Deconvolution: Hogbom or multiscale CLEAN minor cycles inside major cycles, beam
fitting, restoring.

The minor cycle (:func:`hogbom`) is a pure image-plane kernel; the major
cycle (:func:`clean`) recomputes the residual from the visibilities with the
gridder so errors of the minor cycle's PSF approximation do not accumulate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize


@dataclass
class CleanResult:
    model: np.ndarray      # Jy/pixel
    residual: np.ndarray   # Jy/beam
    psf: np.ndarray
    iterations: int
    major_cycles: int
    stop_reason: str
    mask: np.ndarray | None = None       # the clean mask used (automask), if any


def hogbom(residual: np.ndarray, psf: np.ndarray, model: np.ndarray, gain: float, threshold: float,
           niter: int, mask: np.ndarray | None = None) -> int:
    """Subtract scaled, shifted PSFs at the residual's peaks, in place.

    psf is twice the image size or the same size with its peak at (n//2, n//2).
    Stops after niter components or when the peak |residual| < threshold.
    Returns the number of components subtracted.
    """
    ny, nx = residual.shape
    py, px = np.unravel_index(np.argmax(psf), psf.shape)
    search = np.abs(residual) if mask is None else np.abs(residual) * mask
    for i in range(niter):
        k = int(np.argmax(search))
        y, x = divmod(k, nx)
        peak = residual[y, x]
        if abs(peak) < threshold:
            return i
        comp = gain * peak
        model[y, x] += comp
        # overlap of the shifted PSF with the image
        y0, x0 = py - y, px - x
        ys, xs = max(0, -y0), max(0, -x0)
        ye, xe = min(ny, psf.shape[0] - y0), min(nx, psf.shape[1] - x0)
        residual[ys:ye, xs:xe] -= comp * psf[ys + y0:ye + y0, xs + x0:xe + x0]
        sub = np.abs(residual[ys:ye, xs:xe])
        search[ys:ye, xs:xe] = sub if mask is None else sub * mask[ys:ye, xs:xe]
    return niter


def scale_kernel(npix: int, scale_px: float) -> np.ndarray:
    """A multiscale component of diameter scale_px pixels: a tapered paraboloid
    (1 - (2r/scale)^2) with unit sum, centred at (npix//2, npix//2); scale 0 is a
    single pixel."""
    k = np.zeros((npix, npix))
    c = npix // 2
    if scale_px <= 0:
        k[c, c] = 1.0
        return k
    yy, xx = np.mgrid[:npix, :npix]
    r2 = ((yy - c) ** 2 + (xx - c) ** 2) / (scale_px / 2.0) ** 2
    k = np.where(r2 < 1, 1 - r2, 0.0)
    return k / k.sum()


def _convolve_centred(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """a convolved with a kernel centred at (n//2, n//2), same shape as a."""
    from scipy.signal import fftconvolve
    out = fftconvolve(a, k, mode="full")
    oy, ox = k.shape[0] // 2, k.shape[1] // 2
    return out[oy:oy + a.shape[0], ox:ox + a.shape[1]]


@dataclass
class ScaleSet:
    """The kernels of a multiscale CLEAN and the PSF as each pair of scales sees it
    (PSF (x) K_s (x) K_t), computed once per plane."""
    scales: list
    kernels: list          # (npix, npix) each, unit sum
    psf_st: list           # [s][t] (2 npix, 2 npix)
    bias: np.ndarray
    peak: np.ndarray       # PSF_ss at the centre, per scale

    @staticmethod
    def make(psf: np.ndarray, npix: int, scales: list, small_scale_bias: float = 0.6) -> "ScaleSet":
        scales = sorted(float(x) for x in scales)
        big = [scale_kernel(psf.shape[0], sc) for sc in scales]
        psf_s = [_convolve_centred(psf, k) for k in big]
        psf_st = [[_convolve_centred(ps, k) for k in big] for ps in psf_s]
        smax = max(scales) if max(scales) > 0 else 1.0
        c = psf.shape[0] // 2
        return ScaleSet(scales, [scale_kernel(npix, sc) for sc in scales], psf_st,
                        np.array([1 - small_scale_bias * sc / smax for sc in scales]),
                        np.array([psf_st[i][i][c, c] for i in range(len(scales))]))


def multiscale(residual: np.ndarray, psf: np.ndarray, model: np.ndarray, gain: float, threshold: float,
               niter: int, scale_set: ScaleSet, mask: np.ndarray | None = None) -> int:
    """Multiscale CLEAN minor cycle (Cornwell 2008), in place: the residual is
    smoothed with each scale's kernel; each iteration takes the scale and position
    with the largest biased |smoothed residual|, adds gain x that component (the
    kernel times the amplitude that zeroes it) to the model and subtracts its
    response, through the PSF smoothed by both kernels, from every smoothed
    residual. psf is twice the image size with its peak at the centre; larger
    scales are biased down (ScaleSet.bias). Stops after niter components or when
    no smoothed residual exceeds threshold. Returns the number of components."""
    ny, nx = residual.shape
    py, px = np.unravel_index(np.argmax(psf), psf.shape)
    ss = scale_set
    res_s = [_convolve_centred(residual, k) for k in ss.kernels]
    m = np.ones((ny, nx)) if mask is None else mask
    cy, cx = ny // 2, nx // 2
    for it in range(niter):
        peaks = [np.abs(r) * m for r in res_s]
        best = [int(np.argmax(pk)) for pk in peaks]
        vals = np.array([pk.flat[b] for pk, b in zip(peaks, best)])
        if vals.max() < threshold:
            return it
        # the scale whose component removes most residual power: |R_s| / sqrt(PSF_ss peak)
        # (a matched filter), biased towards small scales
        i = int(np.argmax(vals * ss.bias / np.sqrt(ss.peak)))
        y, x = divmod(best[i], nx)
        amp = gain * res_s[i][y, x] / ss.peak[i]
        # the component in the model (Jy/pixel): amp x the scale kernel centred at (y, x)
        ys, xs = max(0, y - cy), max(0, x - cx)
        ye, xe = min(ny, y - cy + ny), min(nx, x - cx + nx)
        model[ys:ye, xs:xe] += amp * ss.kernels[i][ys - (y - cy):ye - (y - cy), xs - (x - cx):xe - (x - cx)]
        y0, x0 = py - y, px - x
        ys, xs = max(0, -y0), max(0, -x0)
        ye, xe = min(ny, psf.shape[0] - y0), min(nx, psf.shape[1] - x0)
        for j, psf_ij in enumerate(ss.psf_st[i]):
            res_s[j][ys:ye, xs:xe] -= amp * psf_ij[ys + y0:ye + y0, xs + x0:xe + x0]
    return niter


def robust_rms(img: np.ndarray) -> float:
    v = img[np.isfinite(img)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else 0.0


def clean(op, niter: int, threshold: float, gain: float = 0.1, cyclefactor: float = 1.5, max_major: int = 20,
          mask: np.ndarray | None = None, nsigma: float = 0.0, automask: bool = False,
          threshold_from_dirty=None, automask_params=None, scales: list | None = None) -> CleanResult:
    """Major/minor-cycle CLEAN of one plane (mfs, or one cube channel) of op, the
    plane's measurement (measurement.OnePointing or JointMosaic).

    Stops at max(threshold, nsigma x robust rms of the residual); the rms is
    measured again after every major cycle, because in the dirty image the
    sidelobes of bright sources inflate it. threshold_from_dirty, if given, maps
    the dirty image's peak to the threshold (a dynamic-range correction)."""
    npix, cell_rad = op.npix, op.cell
    big_psf = op.psf(2 * npix)
    if big_psf.max() <= 0:
        z = np.zeros((npix, npix))
        return CleanResult(z, z.copy(), z.copy(), 0, 0, "no data", None)
    c = npix
    psf_img = big_psf[c - npix // 2:c + npix // 2, c - npix // 2:c + npix // 2]
    sidelobe = _max_sidelobe(psf_img)
    # beam area in pixels from the fitted main lobe (counting PSF pixels above 0.5
    # would include a sparse array's sidelobes)
    bmaj, bmin, _ = fit_beam(psf_img, cell_rad) if automask else (0.0, 0.0, 0.0)
    beam_pixels = np.pi / (4 * np.log(2)) * bmaj * bmin / (cell_rad * 206264.806) ** 2
    scale_set = ScaleSet.make(big_psf, npix, scales) if scales and max(scales) > 0 else None
    model = np.zeros((npix, npix))
    residual = op.dirty()
    if threshold_from_dirty is not None:
        threshold = float(threshold_from_dirty(float(np.abs(residual).max())))
    done, major, reason = 0, 0, "niter reached"
    while done < niter and major < max_major:
        if automask:
            from .automask import AutomaskParams, update_mask
            mask = update_mask(residual, mask, sidelobe, beam_pixels,
                               automask_params or AutomaskParams()).astype(float)
            if not mask.any():
                reason = "automask found no emission"
                break
        search = mask if op.search is None else op.search * (1.0 if mask is None else mask)
        threshold_now = max(threshold, nsigma * robust_rms(residual))
        rmax = np.abs(residual if search is None else residual * search).max()
        if rmax < threshold_now:
            reason = "threshold reached"
            break
        cycle_threshold = max(threshold_now, min(0.95, cyclefactor * sidelobe) * rmax)
        if scale_set is not None:
            n = multiscale(residual, big_psf, model, gain, cycle_threshold, niter - done, scale_set, search)
        else:
            n = hogbom(residual, big_psf, model, gain, cycle_threshold, niter - done, search)
        done += n
        major += 1
        residual = op.residual(model)
        if n == 0:
            reason = "threshold reached"
            break
    else:
        if major >= max_major:
            reason = "major cycle limit"
    return CleanResult(model, residual, psf_img, done, major, reason, mask)


def _max_sidelobe(psf: np.ndarray) -> float:
    """Largest PSF value outside its main lobe (the region where it first drops below 0)."""
    n = psf.shape[0]
    c = n // 2
    row = psf[c, c:]
    first_neg = np.argmax(row < 0) if (row < 0).any() else n // 4
    yy, xx = np.mgrid[:n, :n]
    outside = (yy - c) ** 2 + (xx - c) ** 2 > (1.5 * max(first_neg, 2)) ** 2
    return float(np.abs(psf[outside]).max()) if outside.any() else 0.2


def fit_beam(psf: np.ndarray, cell_rad: float) -> tuple[float, float, float]:
    """Gaussian fitted to the PSF main lobe: (bmaj_arcsec, bmin_arcsec, bpa_deg east of north)."""
    n = psf.shape[0]
    c = n // 2
    h = min(n // 2, 32)
    cut = psf[c - h:c + h, c - h:c + h]
    yy, xx = np.mgrid[-h:h, -h:h]
    # main lobe: pixels above 0.35 connected to the centre (approximated by a radius)
    sel = cut > 0.35
    r_main = np.sqrt(xx[sel] ** 2 + yy[sel] ** 2)
    rmax = np.percentile(r_main, 90) if len(r_main) else 3
    fit = sel & (np.sqrt(xx ** 2 + yy ** 2) <= rmax + 1)

    def model(p):
        a, b, cc = p
        return np.exp(-(a * xx[fit] ** 2 + 2 * b * xx[fit] * yy[fit] + cc * yy[fit] ** 2))

    res = optimize.least_squares(lambda p: model(p) - cut[fit], x0=[0.1, 0.0, 0.1])
    a, b, cc = res.x
    m = np.array([[a, b], [b, cc]])
    evals, evecs = np.linalg.eigh(m)          # ascending: the smaller is the major axis
    sig = np.sqrt(1 / (2 * np.maximum(evals, 1e-12)))
    fwhm = 2 * np.sqrt(2 * np.log(2)) * sig * cell_rad * 206264.806
    dx, dy = evecs[:, 0]                      # major-axis direction in (x west, y north)
    pa = np.degrees(np.arctan2(-dx, dy))      # east of north
    pa = (pa + 90) % 180 - 90
    return float(fwhm[0]), float(fwhm[1]), float(pa)


def gaussian_kernel(npix: int, cell_rad: float, beam: tuple) -> np.ndarray:
    """The restoring beam on the pixel grid, peak 1, centred at (npix//2, npix//2)."""
    bmaj, bmin, bpa = beam
    s = 1 / (2 * np.sqrt(2 * np.log(2))) / (cell_rad * 206264.806)
    smaj, smin = bmaj * s, bmin * s
    th = np.radians(bpa)
    yy, xx = np.mgrid[:npix, :npix] - npix // 2
    # rotate to the beam frame: major axis at PA east of north (east = -x)
    a_ax = -xx * np.sin(th) + yy * np.cos(th)
    b_ax = -xx * np.cos(th) - yy * np.sin(th)
    return np.exp(-0.5 * ((a_ax / smaj) ** 2 + (b_ax / smin) ** 2))


def restore(model: np.ndarray, residual: np.ndarray, cell_rad: float, beam: tuple) -> np.ndarray:
    if not model.any():
        return residual.copy()
    n = model.shape[0]
    # convolve on a grid padded to 2n so components near an edge do not wrap
    kernel = np.fft.ifftshift(gaussian_kernel(2 * n, cell_rad, beam))
    padded = np.zeros((2 * n, 2 * n))
    padded[:n, :n] = model
    conv = np.fft.irfft2(np.fft.rfft2(padded) * np.fft.rfft2(kernel), s=padded.shape)
    return conv[:n, :n] + residual
