"""One image (mfs or cube) from calibrated visibilities: the tclean equivalent.

Stokes I is imaged by gridding both parallel-hand correlations as samples
of I. Each plane (the whole band for mfs, a channel for a cube) is weighted
(Briggs, per-plane density), cleaned with major/minor cycles down to a
threshold of nsigma times the plane's robust rms, restored with the beam
fitted to the PSF (a common beam for a cube: the largest), and divided by
the primary beam.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import deconvolve, gridding
from .products import primary_beam
from ..msio.ms import Vis


@dataclass
class ImageSpec:
    field: str
    specmode: str = "mfs"        # 'mfs' or 'cube'
    npix: int = 256
    cell_arcsec: float = 1.0
    robust: float | None = 0.5
    niter: int = 1000
    nsigma: float = 3.0
    threshold_jy: float = 0.0
    chans: np.ndarray | None = None   # boolean mask of channels used (mfs) / imaged (cube)
    gain: float = 0.1
    pb_limit: float = 0.2
    automask: bool = False              # auto-multithresh-style masks (imaging/automask.py)


@dataclass
class ImageResult:
    image: np.ndarray      # (nplane, ny, nx) restored, Jy/beam
    residual: np.ndarray
    model: np.ndarray
    psf: np.ndarray
    pb: np.ndarray         # (ny, nx)
    pbcor: np.ndarray
    mask: np.ndarray       # (ny, nx) pb >= pb_limit
    freqs: np.ndarray      # plane frequencies
    beam: tuple            # (bmaj", bmin", bpa deg)
    plane_beams: list = field(default_factory=list)
    iterations: int = 0
    stop_reasons: list = field(default_factory=list)
    clean_mask: np.ndarray | None = None   # (nplane, ny, nx) when automasking


def _stokes_i_samples(vis: Vis, chan_idx: np.ndarray):
    """uvw, vis (nsample, nchan), weights for the parallel hands as samples of I."""
    par = [i for i, c in enumerate(vis.corr_types) if c in ("RR", "LL", "XX", "YY", "I")] or [0]
    uvw = np.concatenate([vis.uvw] * len(par))
    data = np.concatenate([vis.data[:, chan_idx, p] for p in par])
    w = np.concatenate([np.where(vis.flag[:, chan_idx, p], 0, vis.weight[:, p:p + 1]) for p in par]).astype(np.float32)
    cross = np.concatenate([vis.ant1 != vis.ant2] * len(par))
    w[~cross] = 0
    return uvw, data, w


def make_image(vis: Vis, spec: ImageSpec, dish_m: float, telescope: str) -> ImageResult:
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    nchan = len(vis.freq)
    chans = np.flatnonzero(spec.chans if spec.chans is not None else np.ones(nchan, bool))
    planes = [chans] if spec.specmode == "mfs" else [np.array([c]) for c in chans]
    uvw, data, w_nat = _stokes_i_samples(vis, chans)
    col = {c: i for i, c in enumerate(chans)}
    images, residuals, models, psfs, beams, reasons, iters, masks = [], [], [], [], [], [], 0, []
    for pl in planes:
        ci = [col[c] for c in pl]
        f = vis.freq[pl]
        w = gridding.briggs_weights(uvw, f, w_nat[:, ci], npix, cell, spec.robust).astype(np.float32)
        v = data[:, ci]
        res = deconvolve.clean(uvw, f, v, w, npix, cell, spec.niter, spec.threshold_jy, gain=spec.gain,
                               nsigma=spec.nsigma, automask=spec.automask)
        masks.append(res.mask if res.mask is not None else np.zeros((npix, npix)))
        beam = deconvolve.fit_beam(res.psf, cell) if res.psf.max() > 0 else (0.0, 0.0, 0.0)
        residuals.append(res.residual)
        models.append(res.model)
        psfs.append(res.psf)
        beams.append(beam)
        reasons.append(res.stop_reason)
        iters += res.iterations
    # a common restoring beam for a cube: the largest of the planes' beams
    good = [b for b in beams if b[0] > 0]
    common = max(good, key=lambda b: b[0] * b[1]) if good else (0.0, 0.0, 0.0)
    for m, r in zip(models, residuals):
        images.append(deconvolve.restore(m, r, cell, common) if common[0] > 0 else r)
    fref = float(np.mean(vis.freq[chans]))
    pb = primary_beam(npix, cell, fref, dish_m, telescope)
    image = np.array(images)
    mask = pb >= spec.pb_limit
    pbcor = np.where(mask[None], image / np.maximum(pb, 1e-6)[None], np.nan)
    freqs = np.array([vis.freq[pl].mean() for pl in planes])
    return ImageResult(image, np.array(residuals), np.array(models), np.array(psfs), pb, pbcor,
                       mask, freqs, common, beams, iters, reasons,
                       np.array(masks) > 0 if spec.automask else None)

