"""Deconvolution: Hogbom or multiscale CLEAN minor cycles inside major cycles, beam
fitting, restoring.

The minor cycle (:func:`hogbom`) is a pure image-plane kernel; the major
cycle (:func:`clean`) recomputes the residual from the visibilities with the
gridder so errors of the minor cycle's PSF approximation do not accumulate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import clean_kernels, fourier, gridding
from .automask import AutomaskParams, update_mask
from ..heuristics.robust import robust_rms


@dataclass
class CleanResult:
    model: np.ndarray      # Jy/pixel
    residual: np.ndarray   # Jy/beam
    psf: np.ndarray
    iterations: int
    major_cycles: int
    stop_reason: str
    mask: np.ndarray | None = None       # the clean mask used (automask), if any


def convolution_grid(psf_shape: tuple, shape: tuple, peak: tuple) -> tuple:
    """The FFT grid on which a PSF (peak at `peak`) convolved with components of an image
    of `shape` does not wrap into the image: circular convolution reaches back into the
    image only from beyond the PSF's farther side of its peak plus the image's extent.
    Each side is rounded up to a length the FFT is fast at (a larger grid only adds
    zeros)."""
    return tuple(fourier.good_size(max(m, n + max(p, m - p))) for m, n, p in zip(psf_shape, shape, peak))


def merge_components(ys: np.ndarray, xs: np.ndarray, amps: np.ndarray, width: int) -> tuple:
    """Components at the same pixel summed (one shift of the PSF each): (uy, ux, total),
    total (npixel,) or (npixel, nterms) as amps is (n,) or (n, nterms)."""
    flat = ys.astype(np.int64) * width + xs
    uniq, inv = np.unique(flat, return_inverse=True)
    total = np.zeros((len(uniq),) + np.shape(amps)[1:])
    np.add.at(total, inv, amps)
    uy, ux = np.divmod(uniq, width)
    return uy, ux, total


def psf_transform(psf: np.ndarray, grid: tuple, peak: tuple, real) -> np.ndarray:
    """rfft2 of the PSF on the grid with its peak moved to (0, 0): the convolution's shift
    is then the component's position."""
    shifted = np.zeros(grid, real)
    # the PSF placed as np.roll of the zero-padded array would put it, without that copy
    rows = (np.arange(psf.shape[0]) - peak[0]) % grid[0]
    cols = (np.arange(psf.shape[1]) - peak[1]) % grid[1]
    shifted[np.ix_(rows, cols)] = psf
    return fourier.rfft2(shifted)


class PsfConvolver:
    """Subtracts point components convolved with the PSF from a whole image: what a
    sub-minor loop (clean_kernels), which only updates its candidate pixels, leaves
    for the rest of the image.

    Few distinct pixels: directly, the PSF shifted onto each (clean_kernels.subtract_psf,
    exact, n_pixels x image size work). Many: one FFT convolution on a grid large
    enough that nothing wraps into the image (twice the image for a centred PSF of
    twice its size, 1.5 times for one of its size), with the PSF's transform
    computed once per plane and reused by every major cycle."""

    def __init__(self, psf: np.ndarray, shape: tuple):
        self.psf = psf
        self.shape = shape
        self.py, self.px = (int(v) for v in np.unravel_index(np.argmax(psf), psf.shape))
        self._ft = None
        self.grid = convolution_grid(psf.shape, shape, (self.py, self.px))

    def subtract(self, image: np.ndarray, ys: np.ndarray, xs: np.ndarray, amps: np.ndarray) -> None:
        if not len(amps):
            return
        uy, ux, total = merge_components(ys, xs, amps, self.shape[1])
        gy, gx = self.grid
        # two transforms of the grid against a pass over the image per pixel
        # (measured crossover: ~40 pixels at 512^2, ~50 at 2048^2)
        if len(uy) * image.size <= 0.5 * gy * gx * np.log2(gy * gx):
            clean_kernels.subtract_psf(image, self.psf, self.py, self.px, uy, ux, total.astype(image.dtype))
            return
        real = np.float32 if image.dtype == np.float32 else np.float64
        if self._ft is None:
            self._ft = psf_transform(self.psf, self.grid, (self.py, self.px), real)
        comps = np.zeros(self.grid, real)
        np.add.at(comps, (uy, ux), total)
        # at most two grid-sized arrays at once (each is 150 MB at 4096^2): the transform
        # is inverted in its own place, not in a copy of it
        ft = fourier.rfft2(comps)
        del comps
        ft *= self._ft
        conv = fourier.irfft2(ft, self.grid, overwrite=True)
        del ft
        image -= conv[:self.shape[0], :self.shape[1]].astype(image.dtype, copy=False)


# the minor cycle's PSF is twice the image up to this size: a component anywhere
# reaches every pixel. Above it the PSF is the image's size, as tclean's and WSClean's:
# twice a 4096^2 image took 6.4 s to grid against 1.0 s, and 2.2 GB (decision 8)
FULL_PSF_MAX_NPIX = 512


def minor_cycle_psf_size(npix: int) -> int:
    """The size of the PSF the minor cycle subtracts (FULL_PSF_MAX_NPIX)."""
    return 2 * npix if npix <= FULL_PSF_MAX_NPIX else npix


# candidates of a row closer than this share a span (clean_kernels.spans)
SPAN_GAP = 32
# Hogbom's list holds the pixels above this fraction of the threshold: a pixel just
# below it that the subtractions raise to the peak is then in the list (on NGC 5921
# at 1024^2 one rose from 0.97 to 1.18 x the threshold and was taken out of order)
SPAN_MARGIN = 0.8
# a list longer than this fraction of the image becomes the whole image
DENSE_FRACTION = 0.25


def _weights(mask: np.ndarray | None, shape: tuple) -> np.ndarray:
    """The search weight of every pixel (the clean mask; 1 everywhere without one)."""
    return np.ones(shape) if mask is None else np.ascontiguousarray(mask, np.float64)


def hogbom(residual: np.ndarray, psf: np.ndarray, model: np.ndarray, gain: float, threshold: float,
           niter: int, mask: np.ndarray | None = None, convolver: PsfConvolver | None = None,
           margin: float = SPAN_MARGIN) -> int:
    """Subtract scaled, shifted PSFs at the residual's peaks, in place.

    psf is the image's size (or twice it, minor_cycle_psf_size) with its peak at its
    centre.
    Stops after niter components or when the peak |residual| x mask < threshold.
    Returns the number of components subtracted.

    WSClean's sub-minor loop: the pixels at or above margin x threshold are collected
    once, and the components are found among them and subtracted from them only
    (clean_kernels.hogbom_subminor, with the full PSF); then the whole residual is
    brought up to date (convolver) and, if a pixel outside the list has risen above
    threshold meanwhile, the loop starts again from the new list. A list of more than
    DENSE_FRACTION of the image (a noise-like residual, where pixels overtake each
    other all the time) becomes the whole image, at about the same cost. The
    components are those of a search over the whole image, in the same order, unless
    a pixel outside a sparse list would have become the peak before the list ran out
    (it is then taken a little later); on NGC 5921 at 1024^2 and 2048^2 (1000
    components, every major cycle) they are the same.
    """
    out, residual, psf = residual, np.ascontiguousarray(residual), np.ascontiguousarray(psf)
    # no mask: no weights (an empty array), rather than an image of ones read at every iteration
    w = np.zeros((0, 0), residual.dtype) if mask is None else np.ascontiguousarray(mask, residual.dtype)
    convolver = convolver or PsfConvolver(psf, residual.shape)
    py, px = convolver.py, convolver.px
    done = 0
    while done < niter:
        run_y, run_x0, run_start, vals, wv = clean_kernels.spans(residual, w, margin * threshold, SPAN_GAP)
        if not len(vals):
            break
        if len(vals) > DENSE_FRACTION * residual.size:
            # the list is most of the image anyway: take all of it, and no pixel is left
            # outside to rise unseen (exactly the whole-image search, at about the same cost)
            run_y, run_x0, run_start, vals, wv = clean_kernels.spans(residual, w, 0.0, SPAN_GAP)
        comp_k = np.zeros(niter - done, np.int64)
        comp_amp = np.zeros(niter - done)
        with clean_kernels.threads_for(len(vals), gridding.nthreads()) as nthreads:
            n = clean_kernels.hogbom_subminor(vals, wv, run_y, run_x0, run_start,
                                              clean_kernels.chunks(run_start, nthreads), psf, py, px,
                                              float(gain), float(threshold), niter - done, comp_k, comp_amp)
        ys, xs = clean_kernels.positions(run_y, run_x0, run_start, comp_k[:n])
        amps = comp_amp[:n]
        np.add.at(model, (ys, xs), amps)
        convolver.subtract(residual, ys, xs, amps)
        done += n
        if n == 0:
            break
    if out is not residual:           # the caller's array was not row-major: a copy was cleaned
        out[...] = residual
    return done


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


def convolve(a: np.ndarray, k: np.ndarray, centre: tuple) -> np.ndarray:
    """a convolved with the kernel k whose centre is at pixel `centre` of k, linearly
    (nothing wraps), on a's pixels, as scipy.signal.fftconvolve's 'full' output cut to a's
    window (imaging.fourier: the imager imports no scipy)."""
    full = [n + m - 1 for n, m in zip(a.shape, k.shape)]
    grid = [fourier.good_size(n) for n in full]
    out = fourier.irfft2(fourier.rfft2(a, grid) * fourier.rfft2(k, grid), grid, overwrite=True)
    (oy, ox), (ny, nx) = centre, a.shape
    return out[oy:oy + ny, ox:ox + nx]


def _convolve_centred(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """a convolved with a kernel centred at (n//2, n//2), same shape as a."""
    return convolve(a, k, (k.shape[0] // 2, k.shape[1] // 2))


@dataclass
class ScaleSet:
    """The kernels of a multiscale CLEAN and the PSF as each pair of scales sees it
    (PSF (x) K_s (x) K_t), computed once per plane."""
    scales: list
    kernels: list          # (npix, npix) each, unit sum
    psf_st: np.ndarray     # [s, t] (nscale, nscale) + the PSF's shape, the PSF's dtype
    bias: np.ndarray
    peak: np.ndarray       # PSF_ss at the centre, per scale

    @staticmethod
    def make(psf: np.ndarray, npix: int, scales: list, small_scale_bias: float = 0.6) -> "ScaleSet":
        scales = sorted(float(x) for x in scales)
        big = [scale_kernel(psf.shape[0], sc) for sc in scales]
        psf_s = [_convolve_centred(psf, k) for k in big]
        # one array (the compiled minor cycle indexes it by scale pair), in the PSF's
        # precision: 9 of them, each the PSF's size
        psf_st = np.empty((len(scales), len(scales)) + psf.shape, psf.dtype)
        for i, ps in enumerate(psf_s):
            for j, k in enumerate(big):
                psf_st[i, j] = _convolve_centred(ps, k)
        smax = max(scales) if max(scales) > 0 else 1.0
        c = psf.shape[0] // 2
        return ScaleSet(scales, [scale_kernel(npix, sc) for sc in scales], psf_st,
                        np.array([1 - small_scale_bias * sc / smax for sc in scales]),
                        np.array([float(psf_st[i, i, c, c]) for i in range(len(scales))]))


def multiscale(residual: np.ndarray, psf: np.ndarray, model: np.ndarray, gain: float, threshold: float,
               niter: int, scale_set: ScaleSet, mask: np.ndarray | None = None,
               convolver: PsfConvolver | None = None) -> int:
    """Multiscale CLEAN minor cycle (Cornwell 2008), in place: the residual is
    smoothed with each scale's kernel; each iteration takes the scale and position
    with the largest biased |smoothed residual|, adds gain x that component (the
    kernel times the amplitude that zeroes it) to the model and subtracts its
    response, through the PSF smoothed by both kernels, from every smoothed
    residual. psf is the image's size (or larger) with its peak at the centre; larger
    scales are biased down (ScaleSet.bias). Stops after niter components or when
    no smoothed residual exceeds threshold. Returns the number of components.

    As hogbom, in sub-minor loops over candidate pixels
    (clean_kernels.multiscale_subminor): of each scale, the pixels that could be
    picked at all. A scale s wins with a value v_s only if v_s f_s >= v_t f_t for
    a value v_t >= threshold of some scale t (f = bias / sqrt(PSF_ss peak)), so
    its candidates are the pixels above threshold x min(f) / f_s (and, as hogbom's,
    down to SPAN_MARGIN of that, or the whole image). After each loop
    the residual is updated with the loop's model (PSF_st = K_s K_t PSF, so every
    smoothed residual is the smoothed residual) and smoothed again for the next."""
    ny, nx = residual.shape
    ss = scale_set
    out, residual, psf = residual, np.ascontiguousarray(residual), np.ascontiguousarray(psf)
    convolver = convolver or PsfConvolver(psf, residual.shape)
    py, px = convolver.py, convolver.px
    w = _weights(mask, residual.shape)
    factor = ss.bias / np.sqrt(ss.peak)
    cyk, cxk = ny // 2, nx // 2
    support = [np.nonzero(k) for k in ss.kernels]
    boxes = [(iy.min(), iy.max() + 1, ix.min(), ix.max() + 1) for iy, ix in support]
    done = 0
    while done < niter:
        parts = []
        n_before = 0
        smoothed = [_convolve_centred(residual, k) for k in ss.kernels]
        floor = [SPAN_MARGIN * threshold * factor.min() / f for f in factor]
        # as hogbom: lists that are most of the image become all of it
        n_list = sum(int(np.count_nonzero(np.abs(r) * w >= fl)) for r, fl in zip(smoothed, floor))
        if n_list > DENSE_FRACTION * residual.size * len(ss.kernels):
            floor = [0.0] * len(ss.kernels)
        for s, res_s in enumerate(smoothed):
            run_y, run_x0, run_start, vals, wv = clean_kernels.spans(res_s, w, floor[s], SPAN_GAP)
            # each scale's own spans (one never spans two scales), one after the other
            parts.append((run_y, run_x0, run_start[:-1] + n_before, np.full(len(run_y), s, np.int64), vals, wv))
            n_before += len(vals)
        if not n_before:
            break
        run_y, run_x0, run_start, run_scale, vals, wv = (np.concatenate(a) for a in zip(*parts))
        run_start = np.append(run_start, n_before)
        comp_k = np.zeros(niter - done, np.int64)
        comp_amp = np.zeros(niter - done)
        with clean_kernels.threads_for(len(vals), gridding.nthreads()) as nthreads:
            n = clean_kernels.multiscale_subminor(vals, wv, run_y, run_x0, run_start, run_scale,
                                                  clean_kernels.chunks(run_start, nthreads), ss.psf_st, py, px,
                                                  float(gain), float(threshold), factor, ss.peak, niter - done,
                                                  comp_k, comp_amp)
        if n == 0:
            break
        done += n
        scale_of = run_scale[np.searchsorted(run_start, comp_k[:n], side="right") - 1]
        cy, cx = clean_kernels.positions(run_y, run_x0, run_start, comp_k[:n])
        # the components (Jy/pixel): amp x the scale's kernel centred on its pixel,
        # over the kernel's support only
        delta = np.zeros(model.shape)
        for s, y, x, amp in zip(scale_of, cy, cx, comp_amp[:n]):
            y0, y1, x0, x1 = boxes[s]
            ys, ye = max(0, y - cyk + y0), min(ny, y - cyk + y1)
            xs, xe = max(0, x - cxk + x0), min(nx, x - cxk + x1)
            if ys < ye and xs < xe:
                delta[ys:ye, xs:xe] += amp * ss.kernels[s][ys - (y - cyk):ye - (y - cyk),
                                                           xs - (x - cxk):xe - (x - cxk)]
        model += delta
        if done < niter:
            dy, dx = np.nonzero(delta)
            convolver.subtract(residual, dy, dx, delta[dy, dx])
    if out is not residual:
        out[...] = residual
    return done


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
    # row-major, as the compiled minor cycle walks them (the gridder's images are transposed views)
    big_psf = np.ascontiguousarray(op.psf(minor_cycle_psf_size(npix)))
    if big_psf.max() <= 0:
        z = np.zeros((npix, npix))
        return CleanResult(z, z.copy(), z.copy(), 0, 0, "no data", None)
    c = big_psf.shape[0] // 2
    lo = c - npix // 2                   # npix pixels about the peak, an odd npix too
    psf_img = big_psf[lo:lo + npix, lo:lo + npix]
    sidelobe = _max_sidelobe(psf_img)
    # beam area in pixels from the fitted main lobe (counting PSF pixels above 0.5
    # would include a sparse array's sidelobes)
    bmaj, bmin, _ = fit_beam(psf_img, cell_rad) if automask else (0.0, 0.0, 0.0)
    beam_pixels = np.pi / (4 * np.log(2)) * bmaj * bmin / (cell_rad * 206264.806) ** 2
    scale_set = ScaleSet.make(big_psf, npix, scales) if scales and max(scales) > 0 else None
    convolver = PsfConvolver(big_psf, (npix, npix))
    model = np.zeros((npix, npix))
    residual = np.ascontiguousarray(op.dirty())
    if threshold_from_dirty is not None:
        threshold = float(threshold_from_dirty(float(np.abs(residual).max())))
    done, major, reason = 0, 0, "niter reached"
    while done < niter and major < max_major:
        if automask:
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
        stop_at = cycle_threshold(threshold_now, rmax, sidelobe, cyclefactor)
        if scale_set is not None:
            n = multiscale(residual, big_psf, model, gain, stop_at, niter - done, scale_set, search,
                           convolver)
        else:
            n = hogbom(residual, big_psf, model, gain, stop_at, niter - done, search, convolver)
        done += n
        major += 1
        residual = np.ascontiguousarray(op.residual(model))
        if n == 0:
            reason = "threshold reached"
            break
    else:
        if major >= max_major:
            reason = "major cycle limit"
    return CleanResult(model, residual, psf_img, done, major, reason, mask)


# tclean's bounds on how deep a major cycle's minor cycle cleans, as a fraction of the
# residual's peak (its minpsffraction and maxpsffraction): at least 0.05, at most 0.8,
# whatever the PSF's sidelobes.
MIN_PSF_FRACTION = 0.05
MAX_PSF_FRACTION = 0.8


def cycle_threshold(threshold: float, peak: float, sidelobe: float, cyclefactor: float) -> float:
    """Where a minor cycle stops, as tclean sets it: cyclefactor x the PSF's largest
    sidelobe of the residual's peak, bounded to [MIN_PSF_FRACTION, MAX_PSF_FRACTION],
    and never below the clean's own threshold. Under a poor PSF (sidelobes above
    0.53) the cap still lets a cycle take several components: at 0.95 it took one."""
    fraction = min(MAX_PSF_FRACTION, max(MIN_PSF_FRACTION, cyclefactor * sidelobe))
    return max(threshold, fraction * peak)


def _max_sidelobe(psf: np.ndarray) -> float:
    """Largest PSF value outside its main lobe (the region where it first drops below 0)."""
    n = psf.shape[0]
    c = n // 2
    row = psf[c, c:]
    first_neg = np.argmax(row < 0) if (row < 0).any() else n // 4
    yy, xx = np.ogrid[:n, :n]
    outside = (yy - c) ** 2 + (xx - c) ** 2 > (1.5 * max(first_neg, 2)) ** 2
    return float(np.abs(psf[outside]).max()) if outside.any() else 0.2


# tclean's psfcutoff: the main lobe is fitted where the PSF is above this
PSF_CUTOFF = 0.35


def main_lobe(psf: np.ndarray, cutoff: float = PSF_CUTOFF, nrays: int = 720) -> tuple:
    """The PSF's main lobe: the pixels reached from the peak along a straight ray
    that stays above cutoff, as CASA's tclean finds it for its beam fit (sidelobes
    above the cutoff beyond a dip are left out). Each of nrays rays is walked out
    in quarter-pixel steps to its first sample below cutoff (bilinear), and a pixel
    belongs if it is nearer the peak than its direction's edge (interpolated between
    rays). Whatever its size in pixels: the window is the lobe's extent.
    Returns (dy, dx, values): the lobe's pixels relative to the peak and the PSF there."""
    py, px = np.unravel_index(np.argmax(psf), psf.shape)
    theta = np.linspace(0, 2 * np.pi, nrays, endpoint=False)
    # the farthest a ray can go inside the array
    rmax = float(min(py, px, psf.shape[0] - 1 - py, psf.shape[1] - 1 - px))
    steps = np.arange(0.25, max(rmax, 0.25) + 0.25, 0.25)
    sin, cos = np.sin(theta), np.cos(theta)
    # each ray's edge: its first sample below the cutoff (the whole ray if none). The
    # rays are walked out in growing stretches, each ray only until it has its edge: a
    # lobe is a few pixels across and the array hundreds, and sampling every ray to the
    # array's edge was half of a cube piece's time
    edge = np.full(nrays, steps[-1])
    todo, start, stop = np.arange(nrays), 0, min(len(steps), 64)
    while todo.size and start < len(steps):
        st = steps[start:stop]
        yy = py + sin[todo, None] * st[None, :]
        xx = px + cos[todo, None] * st[None, :]
        below = bilinear(psf, yy, xx) < cutoff
        hit = below.any(axis=1)
        edge[todo[hit]] = st[np.argmax(below[hit], axis=1)]
        todo, start, stop = todo[~hit], stop, min(len(steps), 2 * stop)
    h = int(np.ceil(edge.max())) + 1
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
    r = np.hypot(dy, dx)
    ang = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    edge_at = np.interp(ang, np.append(theta, 2 * np.pi), np.append(edge, edge[0]))
    inside = (r < edge_at) & (py + dy >= 0) & (py + dy < psf.shape[0]) & (px + dx >= 0) & (px + dx < psf.shape[1])
    dy, dx = dy[inside], dx[inside]
    return dy, dx, psf[py + dy, px + dx]


def bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The image at fractional pixels (y, x) within it, interpolated linearly between its
    four nearest pixels (scipy.ndimage.map_coordinates at order 1)."""
    y0 = np.clip(np.floor(y).astype(np.int64), 0, image.shape[0] - 2)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, image.shape[1] - 2)
    fy, fx = y - y0, x - x0
    return ((image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx) * (1 - fy)
            + (image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx) * fy)


def fit_exp_quadratic(xx: np.ndarray, yy: np.ndarray, val: np.ndarray, p0, max_steps: int = 200) -> np.ndarray:
    """(a, b, c) of exp(-(a x² + 2b xy + c y²)) fitted to val by least squares:
    Levenberg-Marquardt with Marquardt's scaling (steps measured against the curvature
    of each parameter, so that their sizes need no scale of their own), stopped when a
    step changes the cost or the parameters by less than 1e-12 of themselves."""
    if not np.isfinite(val).all():
        raise ValueError("fit_exp_quadratic: the values fitted are not all finite (a PSF with NaNs?)")
    basis = np.stack([xx * xx, 2.0 * xx * yy, yy * yy], axis=1)
    p = np.asarray(p0, float)
    model = np.exp(-(basis @ p))
    resid = model - val
    cost, damping = float(resid @ resid), 1e-3
    for _ in range(max_steps):
        jac = -basis * model[:, None]
        jtj, grad = jac.T @ jac, jac.T @ resid
        step = np.linalg.lstsq(jtj + damping * np.diag(np.diag(jtj)), -grad, rcond=None)[0]
        trial = p + step
        model_t = np.exp(-(basis @ trial))
        resid_t = model_t - val
        cost_t = float(resid_t @ resid_t)
        if cost_t <= cost:
            small = cost - cost_t <= 1e-12 * cost or np.linalg.norm(step) <= 1e-12 * np.linalg.norm(p)
            p, model, resid, cost, damping = trial, model_t, resid_t, cost_t, max(damping / 10, 1e-15)
            if small:
                break
        else:
            damping *= 10
            if damping > 1e15:
                break
    return p


def fit_beam(psf: np.ndarray, cell_rad: float) -> tuple[float, float, float]:
    """Gaussian fitted to the PSF main lobe: (bmaj_arcsec, bmin_arcsec, bpa_deg east of north).

    The fit covers the whole lobe above tclean's psfcutoff (main_lobe), however many
    pixels it spans: a fixed window smaller than the beam turns the ellipse (10-15
    degrees on NGC 5921 at a 1" cell, where the lobe is ~60 pixels across)."""
    dy, dx, val = main_lobe(psf)
    xx, yy = dx.astype(float), dy.astype(float)
    # start from a round Gaussian through the cutoff at the lobe's mean radius
    r_mean = max(float(np.mean(np.hypot(xx, yy))) * 1.5, 1.0)
    a0 = -np.log(PSF_CUTOFF) / r_mean ** 2

    a, b, cc = fit_exp_quadratic(xx, yy, np.asarray(val, float), [a0, 0.0, a0])
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
    # the beam out to 6.5 sigma of its major axis (below 1e-9 of its peak), not a
    # kernel of twice the image: at 4096^2 that was 1 GB of coordinates and 1.6 s
    sigma_px = beam[0] / (2 * np.sqrt(2 * np.log(2))) / (cell_rad * 206264.806)
    h = int(min(n, np.ceil(6.5 * sigma_px) + 1))
    kernel = gaussian_kernel(2 * h + 1, cell_rad, beam)
    # linear convolution, cropped to the image: components near an edge do not wrap
    return convolve(model, kernel, (h, h)) + residual
