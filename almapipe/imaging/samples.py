"""Streaming data preparation for mfs images: the Stokes I samples of an spw read
from the MS in chunks of rows, weighted and averaged over channel bins in one
compiled pass per chunk (kernels.stokes_i_bins), so that what an mfs image holds
is (rows x bins), never (rows x channels x correlations): its memory does not grow
with the number of channels.

The bins are contiguous channels no wider than max_frac of their frequency; the
gridder takes the bins' frequencies as its frequency axis. Averaging a bin moves
each channel's uv point radially by at most max_frac of its length, which smears
a source at the image's edge (npix / 2 pixels out) by max_frac x npix / 2 pixels:
the default max_frac = 1 / npix keeps that within half a pixel (bandwidth smearing,
Thompson, Moran & Swenson ch. 6.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import deconvolve, gridding, kernels
from .measurement import OnePointing

if TYPE_CHECKING:
    from .imager import Planes

# rows per chunk so that a chunk's DATA, FLAG and their kernel's view stay near this
CHUNK_BYTES = 16 << 20


@dataclass
class BinnedStokesI:
    """Stokes I samples of one spw over channel bins: one per cross-correlation row
    with any unflagged data (auto-correlations left out)."""
    uvw: np.ndarray        # (nrow, 3) m
    freq: np.ndarray       # (nbin,) Hz, the mean frequency of each bin's channels
    data: np.ndarray       # (nrow, nbin) complex64
    weight: np.ndarray     # (nrow, nbin) float32, 0 where flagged


def channel_bins(freq: np.ndarray, chans: np.ndarray, max_frac: float) -> tuple:
    """Each channel's bin (-1 where not in chans) and the bins' mean frequencies:
    chans in channel order, a new bin wherever the next channel lies more than
    max_frac of the bin's first frequency from it."""
    chan_bin = np.full(len(freq), -1, np.int64)
    first, nbin = None, 0
    for c in sorted(int(c) for c in chans):
        if first is None or abs(freq[c] - first) > max_frac * abs(first):
            first, nbin = freq[c], nbin + 1
        chan_bin[c] = nbin - 1
    if not nbin:
        raise ValueError("channel_bins: no channels selected")
    fbin = np.array([freq[chan_bin == b].mean() for b in range(nbin)])
    return chan_bin, fbin


def read_binned_stokes_i(ms: str, spw: int, field_ids, chans, max_frac: float, column: str = "DATA",
                         chunk_bytes: int = CHUNK_BYTES) -> BinnedStokesI:
    """Stokes I over channel bins of the given channels of one spw and fields, read
    in chunks of rows of about chunk_bytes (their DATA and FLAG), never the whole
    spw at once."""
    import casacore.tables as ct
    from ..msio.ms import MSError, corr_types_of_spw, spw_rows_query, subtable
    q = spw_rows_query(ms, spw, field_ids, cross_only=True)
    with subtable(ms, "SPECTRAL_WINDOW") as t:
        freq = np.asarray(t.getcell("CHAN_FREQ", spw), float)
    corr = corr_types_of_spw(ms, spw)
    pols = np.array([i for i, c in enumerate(corr) if c in ("RR", "LL", "XX", "YY", "I")] or [0], np.int64)
    chans = np.flatnonzero(chans) if np.asarray(chans).dtype == bool else np.asarray(chans, np.int64)
    chan_bin, fbin = channel_bins(freq, chans, max_frac)
    with ct.table(ms, ack=False) as t:
        if column not in t.colnames():
            raise MSError(f"{ms}: no {column} column")
        sel = t.query(q)
        nrow = sel.nrows()
        uvw = sel.getcol("UVW") if nrow else np.zeros((0, 3))
        vis = np.zeros((nrow, len(fbin)), np.complex64)
        wgt = np.zeros((nrow, len(fbin)), np.float32)
        step = max(1, int(chunk_bytes // max(1, len(freq) * len(corr) * 9)))
        for start in range(0, nrow, step):
            n = min(step, nrow - start)
            data = sel.getcol(column, startrow=start, nrow=n).astype(np.complex64, copy=False)
            flag = sel.getcol("FLAG", startrow=start, nrow=n)
            flag |= sel.getcol("FLAG_ROW", startrow=start, nrow=n)[:, None, None]
            weight = sel.getcol("WEIGHT", startrow=start, nrow=n).astype(np.float32, copy=False)
            kernels.stokes_i_bins(data, flag, weight, chan_bin, pols, vis, wgt, start)
            del data, flag
        sel.close()
    keep = wgt.any(axis=1)
    return BinnedStokesI(uvw[keep], fbin, vis[keep], wgt[keep])


def clean_mfs(samples: BinnedStokesI, spec) -> Planes:
    """The one plane of an mfs image (imager.ImageSpec, one pointing) from binned
    samples: weighted (Briggs over all bins), cleaned and its beam fitted, as
    imager.clean_planes does for a Vis; restore with imager.restore_planes."""
    from .automask import AutomaskParams
    from .imager import Planes
    if spec.specmode != "mfs" or spec.mosaic is not None:
        raise ValueError("clean_mfs: one mfs plane of one pointing only "
                         f"(got specmode {spec.specmode!r}, mosaic {spec.mosaic is not None})")
    npix = spec.npix
    cell = np.radians(spec.cell_arcsec / 3600.0)
    w = gridding.briggs_weights(samples.uvw, samples.freq, samples.weight, npix, cell, spec.robust)
    op = OnePointing(samples.uvw, samples.freq, samples.data, w.astype(np.float32, copy=False), npix, cell)
    del w
    res = deconvolve.clean(op, spec.niter, spec.threshold_jy, gain=spec.gain, nsigma=spec.nsigma,
                           automask=spec.automask, threshold_from_dirty=spec.threshold_from_dirty,
                           automask_params=AutomaskParams(negative_threshold=spec.negative_threshold),
                           scales=spec.scales)
    beam = deconvolve.fit_beam(res.psf, cell) if res.psf.max() > 0 else (0.0, 0.0, 0.0)
    freq = np.array([np.average(samples.freq, weights=np.maximum(samples.weight.sum(axis=0), 1e-30))])
    return Planes([res.model], [res.residual], [res.psf], [beam], freq, [res.stop_reason], res.iterations,
                  [res.mask if res.mask is not None else np.zeros((npix, npix))])
