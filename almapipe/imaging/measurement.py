"""What the major cycle needs from the data of one image plane: its PSF, its dirty
image, and the residual image of a model. CLEAN (deconvolve.clean) only talks to
these, so one pointing and a joint mosaic are cleaned by the same loop.

OnePointing: the visibilities of one phase centre; images are 'apparent' (the sky
times the primary beam), as tclean makes them for one field.

JointMosaic: several pointings of one source on one image grid, combined with
their primary beams as a linear mosaic inside every major cycle:

    R = sum_p f_p PB_p D_p / sqrt(A max A),    A = sum_p f_p PB_p^2,

D_p each pointing's dirty image (normalised by its own weights), f_p its share
of the data's weight. A point source of flux S gives R = S sqrt(A / max A), so R
is the sky times the mosaic's primary beam pb = sqrt(A / max A) (CASA's
'flatnoise' normalisation: one pointing gives back PB_p D_p / PB_p = D_p), and the
noise is flat where pointings overlap. The model found in R is apparent too; for
the residual each pointing predicts PB_p x model / pb, its own view of the sky.
"""
from __future__ import annotations

import numpy as np

from . import gridding
from .deconvolve import minor_cycle_psf_size
from .products import joint_coverage


class OnePointing:
    """The samples of one plane at one phase centre (uvw in m, vis (nrow, nchan),
    imaging weights (nrow, nchan)) and the image grid."""

    def __init__(self, uvw, freq, vis, wgt, npix: int, cell_rad: float, wgridding: bool | None = None):
        self.uvw, self.freq, self.vis, self.wgt = uvw, freq, vis, wgt
        self.npix, self.cell = npix, cell_rad
        # w-gridding only where the w-term matters (gridding.needs_wgridding) on the
        # largest grid imaged: the minor cycle's PSF
        self.wgridding = gridding.needs_wgridding(uvw, freq, minor_cycle_psf_size(npix), cell_rad) \
            if wgridding is None else wgridding
        self.sum_w = float(wgt.sum())
        self.search = None            # anywhere in the image may hold a component

    def psf(self, npix: int) -> np.ndarray:
        """The PSF on an npix grid (the minor cycle's: deconvolve.minor_cycle_psf_size), peak 1."""
        p = gridding.psf(self.uvw, self.freq, self.wgt, npix, self.cell, self.wgridding)
        return p / p.max() if p.max() > 0 else p

    def dirty(self) -> np.ndarray:
        return gridding.dirty(self.uvw, self.freq, self.vis, self.wgt, self.npix, self.cell, self.wgridding)

    def residual(self, model: np.ndarray) -> np.ndarray:
        """The dirty image of the data minus the model's visibilities (model in Jy/pixel)."""
        model_vis = gridding.predict(self.uvw, self.freq, model, self.cell, self.wgridding)
        return gridding.dirty(self.uvw, self.freq, self.vis - model_vis, self.wgt, self.npix, self.cell,
                              self.wgridding)


class JointMosaic:
    """Pointings (OnePointing each, their visibilities already phased to the image
    centre), their primary beams on the image grid, and their shares of the weight."""

    def __init__(self, pointings: list, beams: list, fractions, pb_limit: float = 0.2):
        self.pointings, self.beams = pointings, beams
        self.fractions = np.asarray(fractions, float) / max(float(np.sum(fractions)), 1e-30)
        self.npix, self.cell = pointings[0].npix, pointings[0].cell
        a = joint_coverage(beams, self.fractions)
        self.norm = np.sqrt(np.maximum(a * a.max(), 1e-30))
        self.pb = np.sqrt(a / a.max())
        # components only where the mosaic's beam is not too small to divide by
        self.search = self.pb >= pb_limit

    def psf(self, npix: int) -> np.ndarray:
        """The weighted mean of the pointings' PSFs, peak 1 (the minor cycle's
        approximation; the major cycle corrects it)."""
        p = sum(f * q.psf(npix) for f, q in zip(self.fractions, self.pointings) if q.sum_w > 0)
        return p / p.max() if np.max(p) > 0 else np.zeros((npix, npix))

    def dirty(self) -> np.ndarray:
        return self._combine([q.dirty() if q.sum_w > 0 else 0.0 for q in self.pointings])

    def residual(self, model: np.ndarray) -> np.ndarray:
        sky = np.where(self.search, model / np.maximum(self.pb, 1e-6), 0.0)
        return self._combine([q.residual(b * sky) if q.sum_w > 0 else 0.0
                              for q, b in zip(self.pointings, self.beams)])

    def _combine(self, images: list) -> np.ndarray:
        return sum(f * b * d for f, b, d in zip(self.fractions, self.beams, images)) / self.norm
