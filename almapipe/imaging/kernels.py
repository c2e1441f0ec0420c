"""Compiled inner loops of imaging (numba): one pass over the visibilities each."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def stokes_i(data, flag, weight, rows, chans, pols):
    """Stokes I samples: for each of the given rows and channels the weighted mean of
    the given (parallel-hand) correlations and the sum of their weights (0 where all
    are flagged). Gridding one such sample is the same as gridding each correlation
    as a sample of I with its own weight, at half the work.

    data (nrow, nchan, ncorr) complex64, flag (nrow, nchan, ncorr), weight (nrow, ncorr).
    Returns (vis (len(rows), len(chans)) complex64, wgt float32)."""
    nr, nc, npol = len(rows), len(chans), len(pols)
    vis = np.zeros((nr, nc), np.complex64)
    wgt = np.zeros((nr, nc), np.float32)
    for k in numba.prange(nr):
        r = rows[k]
        for j in range(nc):
            c = chans[j]
            ws = np.float32(0.0)
            acc = np.complex64(0.0)
            for q in range(npol):
                p = pols[q]
                if not flag[r, c, p]:
                    w = weight[r, p]
                    ws += w
                    acc += w * data[r, c, p]
            if ws > 0:
                vis[k, j] = acc / ws
                wgt[k, j] = ws
    return vis, wgt


@numba.njit(cache=True)
def briggs(u_m, v_m, lam_inv, weight, npix, cell_rad, robust):
    """Briggs imaging weights (nrow, nchan) from natural weights, CASA's formula, with
    the weight density of this plane's samples on the image's uv grid (cells of
    1 / (npix cell) wavelengths; a sample and its conjugate both count; samples whose
    cell or conjugate cell falls off the grid get weight 0).

    u_m, v_m (nrow,) metres; lam_inv (nchan,) 1/m; weight (nrow, nchan)."""
    nrow, nchan = weight.shape
    du = 1.0 / (npix * cell_rad)
    half = npix / 2
    cell = np.full((nrow, nchan), -1, np.int64)
    dens = np.zeros(npix * npix)
    dens_c = np.zeros(npix * npix)
    sum_w = 0.0
    for r in range(nrow):
        for c in range(nchan):
            u = u_m[r] * lam_inv[c] / du
            v = v_m[r] * lam_inv[c] / du
            iu, iv = int(np.floor(u + half)), int(np.floor(v + half))
            ju, jv = int(np.floor(-u + half)), int(np.floor(-v + half))
            if 0 <= iu < npix and 0 <= iv < npix and 0 <= ju < npix and 0 <= jv < npix:
                w = np.float64(weight[r, c])
                cell[r, c] = iu * npix + iv
                dens[iu * npix + iv] += w
                dens_c[ju * npix + jv] += w
                sum_w += 2 * w
    out = np.zeros((nrow, nchan))
    if sum_w <= 0:
        return out
    dens += dens_c
    f2 = (5.0 * 10 ** (-robust)) ** 2 / ((dens ** 2).sum() / sum_w)
    for r in range(nrow):
        for c in range(nchan):
            k = cell[r, c]
            if k >= 0:
                out[r, c] = weight[r, c] / (1.0 + dens[k] * f2)
    return out


@numba.njit(parallel=True, cache=True)
def shift_spectra(data, flag, shift):
    """Each row's spectrum moved onto another channel grid: output channel j takes
    the row's value at channel position j + shift[row], linearly interpolated
    between its two neighbours; flagged where a neighbour it needs is flagged or off
    the band. data (nrow, nchan, ncorr) complex64, flag the same shape, shift (nrow,).
    Returns (data, flag)."""
    nrow, nchan, ncorr = data.shape
    out = np.zeros_like(data)
    oflag = np.ones(flag.shape, np.bool_)
    for r in numba.prange(nrow):
        for j in range(nchan):
            x = j + shift[r]
            i0 = int(np.floor(x))
            a = x - i0
            if a < 1e-6:            # on a channel: nothing to interpolate
                a = 0.0
            elif a > 1 - 1e-6:
                i0 += 1
                a = 0.0
            i1 = i0 + 1 if a > 0 else i0
            if i0 < 0 or i1 > nchan - 1:
                continue
            for p in range(ncorr):
                if flag[r, i0, p] or flag[r, i1, p]:
                    continue
                out[r, j, p] = (1 - a) * data[r, i0, p] + a * data[r, i1, p]
                oflag[r, j, p] = False
    return out, oflag


@numba.njit(parallel=True, cache=True)
def stokes_i_bins(data, flag, weight, chan_bin, pols, vis_out, wgt_out, row0):
    """Stokes I samples averaged over channel bins, in one pass over a chunk of rows:
    for row r of the chunk and each bin b, the weighted mean of the given
    (parallel-hand) correlations of the bin's unflagged channels goes to
    vis_out[row0 + r, b] and the sum of their weights to wgt_out[row0 + r, b]
    (0 where all are flagged). Gridding such a sample at the bin's frequency is
    gridding each of its channels at its own to within the bin's width.

    data (nrow, nchan, ncorr) complex64, flag the same shape, weight (nrow, ncorr);
    chan_bin (nchan,) each channel's bin, -1 for channels not taken."""
    nrow, nchan = data.shape[0], data.shape[1]
    nbin = vis_out.shape[1]
    for r in numba.prange(nrow):
        o = row0 + r
        for b in range(nbin):
            vis_out[o, b] = 0
            wgt_out[o, b] = 0
        for c in range(nchan):
            b = chan_bin[c]
            if b < 0:
                continue
            for q in range(len(pols)):
                p = pols[q]
                if not flag[r, c, p]:
                    w = weight[r, p]
                    wgt_out[o, b] += w
                    vis_out[o, b] += w * data[r, c, p]
        for b in range(nbin):
            if wgt_out[o, b] > 0:
                vis_out[o, b] /= wgt_out[o, b]
