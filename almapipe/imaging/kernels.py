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


def subtract_continuum_rows(data, flag, weight, rows, cont_mask, order, vsum, wsum):
    """uvcontsub's pass over a row block, in place: for each selected row (rows, bool
    (nrow,)) and correlation, the polynomial of the given order in x (-1 .. 1 across
    the channels) fitted by least squares to the unflagged continuum channels
    (cont_mask) is subtracted from every channel; a (row, correlation) with no more
    than `order` such channels is left as it is. Before the subtraction, the weighted
    sum of the unflagged data and the sum of their weights are added per channel to
    vsum (complex128) and wsum (float64): the target's spectrum.

    data (nrow, nchan, ncorr) complex64, flag the same shape, weight (nrow, ncorr).
    The fit's normal equations are summed and solved in float64 (order <= 3)."""
    fit = np.zeros((0, int(order) + 1, data.shape[2]), np.complex64)
    _subtract_continuum_rows(data, flag, weight, rows, cont_mask, int(order), vsum, wsum, fit, True,
                             numba.get_num_threads())


def fit_continuum_rows(data, flag, weight, rows, cont_mask, order, fit, vsum, wsum):
    """The same fit as ``subtract_continuum_rows``, kept instead of subtracted: the
    coefficients of each selected row and correlation go to fit (nrow, nterms > order,
    ncorr) complex64 (term i multiplies x**i; the terms above `order`, and rows with too
    few continuum channels, stay as they were); data are left as they are. The
    visibility store subtracts the polynomial when the data are read
    (visstore.subtract_continuum_fit), so uvcontsub writes a few coefficients a row
    instead of a second copy of the target's data."""
    if fit.ndim != 3 or fit.shape[0] != data.shape[0] or fit.shape[2] != data.shape[2] or fit.shape[1] <= order:
        raise ValueError(f"fit has shape {fit.shape}; expected ({data.shape[0]}, > {order}, {data.shape[2]})")
    _subtract_continuum_rows(data, flag, weight, rows, cont_mask, int(order), vsum, wsum, fit, False,
                             numba.get_num_threads())


@numba.njit(parallel=True, cache=True)
def _subtract_continuum_rows(data, flag, weight, rows, cont_mask, order, vsum, wsum, fit, subtract, nthread):
    nrow, nchan, ncorr = data.shape
    nk = order + 1
    x = np.empty(nchan)
    for c in range(nchan):
        x[c] = -1.0 + 2.0 * c / (nchan - 1) if nchan > 1 else -1.0
    selected = np.flatnonzero(rows)
    vpart = np.zeros((nthread, nchan), np.complex128)
    wpart = np.zeros((nthread, nchan))
    for t in numba.prange(nthread):
        a = np.empty((nk, nk))
        br = np.empty(nk)
        bi = np.empty(nk)
        xp = np.empty(2 * nk - 1)
        for k in range(t, len(selected), nthread):
            r = selected[k]
            for p in range(ncorr):
                w_row = weight[r, p]
                for c in range(nchan):
                    if not flag[r, c, p]:
                        vpart[t, c] += w_row * data[r, c, p]
                        wpart[t, c] += w_row
                for i in range(nk):
                    br[i] = 0.0
                    bi[i] = 0.0
                    for j in range(nk):
                        a[i, j] = 0.0
                n = 0
                for c in range(nchan):
                    if flag[r, c, p] or not cont_mask[c]:
                        continue
                    n += 1
                    xp[0] = 1.0
                    for m in range(1, 2 * nk - 1):
                        xp[m] = xp[m - 1] * x[c]
                    d = data[r, c, p]
                    for i in range(nk):
                        br[i] += xp[i] * d.real
                        bi[i] += xp[i] * d.imag
                        for j in range(nk):
                            a[i, j] += xp[i + j]
                if n <= order:
                    continue
                # Gaussian elimination with partial pivoting (a is symmetric positive
                # definite for n > order distinct x, so this never meets a zero pivot)
                for i in range(nk):
                    piv = i
                    for m in range(i + 1, nk):
                        if abs(a[m, i]) > abs(a[piv, i]):
                            piv = m
                    if piv != i:
                        for j in range(nk):
                            a[i, j], a[piv, j] = a[piv, j], a[i, j]
                        br[i], br[piv] = br[piv], br[i]
                        bi[i], bi[piv] = bi[piv], bi[i]
                    for m in range(i + 1, nk):
                        f = a[m, i] / a[i, i]
                        for j in range(i, nk):
                            a[m, j] -= f * a[i, j]
                        br[m] -= f * br[i]
                        bi[m] -= f * bi[i]
                for i in range(nk - 1, -1, -1):
                    for j in range(i + 1, nk):
                        br[i] -= a[i, j] * br[j]
                        bi[i] -= a[i, j] * bi[j]
                    br[i] /= a[i, i]
                    bi[i] /= a[i, i]
                if not subtract:
                    for i in range(nk):
                        fit[r, i, p] = np.complex64(complex(br[i], bi[i]))
                    continue
                for c in range(nchan):
                    mr = 0.0
                    mi = 0.0
                    xc = 1.0
                    for i in range(nk):
                        mr += br[i] * xc
                        mi += bi[i] * xc
                        xc *= x[c]
                    d = data[r, c, p]
                    data[r, c, p] = np.complex64(complex(d.real - mr, d.imag - mi))
    for t in range(nthread):
        for c in range(nchan):
            vsum[c] += vpart[t, c]
            wsum[c] += wpart[t, c]


@numba.njit(cache=True)
def adjacent_difference_counts(data, flag, weight, rows, idx, counts, shift, first, hi):
    """The noise sketch's pass (samples.MedianSketch): for each of the given rows and
    correlations and each pair of selected channels idx[k], idx[k + 1] that are adjacent
    and both unflagged, v = |Re(V[idx[k + 1]] - V[idx[k]])| sqrt(w) is counted into the
    histogram `counts` of float32 bit patterns: bin (bits of float32(v) >> shift) - first
    + 1, zeros, values below the first bin and what is not a number in bin 0, hi and
    above in the last. The same float32 arithmetic as the array expression it replaces;
    returns how many it counted. No temporaries: the numpy version held the differences
    of a block several times."""
    n = 0
    last = len(counts) - 1
    as_float = np.zeros(1, np.float32)
    as_bits = as_float.view(np.uint32)
    for rr in range(len(rows)):
        r = rows[rr]
        for p in range(data.shape[2]):
            sw = np.sqrt(weight[r, p])
            for k in range(len(idx) - 1):
                c0 = idx[k]
                c1 = idx[k + 1]
                if c1 != c0 + 1 or flag[r, c0, p] or flag[r, c1, p]:
                    continue
                v = np.abs((data[r, c1, p] - data[r, c0, p]).real) * sw
                b = 0
                if v >= hi:
                    b = last
                elif v > 0:
                    as_float[0] = v
                    b = min(max(np.int64(as_bits[0] >> shift) - first + 1, 0), last)
                counts[b] += 1
                n += 1
    return n


@numba.njit(parallel=True, cache=True)
def subtract_polynomial(data, fit, xpow, out):
    """out = data (rows, channels, correlations) minus each row's polynomial in the
    channel abscissa: fit[r, 0, p] + sum over i >= 1 of fit[r, i, p] xpow[i, c], the terms
    subtracted one after the other in float32 as the array expression did (xpow[i] the
    abscissa to the power i, float32; its row count the number of terms taken). One pass,
    no temporaries: a continuum-subtracted view's DATA are read through it."""
    nterms = xpow.shape[0]
    for r in numba.prange(data.shape[0]):
        for c in range(data.shape[1]):
            for p in range(data.shape[2]):
                v = data[r, c, p] - fit[r, 0, p]
                for i in range(1, nterms):
                    v -= fit[r, i, p] * xpow[i, c]
                out[r, c, p] = v


@numba.njit(cache=True, nogil=True)
def _rows_with_data(flag, chans):
    out = np.zeros(flag.shape[0], np.bool_)
    for r in range(flag.shape[0]):
        for c in chans:
            for p in range(flag.shape[2]):
                if not flag[r, c, p]:
                    out[r] = True
                    break
            if out[r]:
                break
    return out


@numba.njit(cache=True, nogil=True)
def _channels_with_data(flag, rows):
    nchan = flag.shape[1]
    out = np.zeros(nchan, np.bool_)
    left = nchan
    for r in rows:
        for c in range(nchan):
            if out[c]:
                continue
            for p in range(flag.shape[2]):
                if not flag[r, c, p]:
                    out[c] = True
                    left -= 1
                    break
        if left == 0:       # mostly unflagged data: done after a row or two
            break
    return out


def rows_with_data(flag: np.ndarray, chans: np.ndarray | None = None) -> np.ndarray:
    """Per row of flag (nrow, nchan, ncorr): whether any sample in the channels chans (a
    mask; None: all) is unflagged. ~flag[:, chans].all(axis=(1, 2)) without its copy:
    numpy's boolean indexing on the middle axis took 20x as long as the test itself."""
    return _rows_with_data(flag, _mask_indices(chans, flag.shape[1], "chans"))


def channels_with_data(flag: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per channel of flag (nrow, nchan, ncorr): whether any sample of the rows (a mask;
    None: all) is unflagged. ~flag[rows].all(axis=(0, 2)), stopping once every channel
    has data."""
    return _channels_with_data(flag, _mask_indices(rows, flag.shape[0], "rows"))


def _mask_indices(mask, n: int, what: str) -> np.ndarray:
    """The indices of a boolean mask of n entries (None: all): the kernels index with
    them unchecked, so a mask of another length is refused here."""
    if mask is None:
        return np.arange(n, dtype=np.int64)
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (n,):
        raise ValueError(f"{what}: a boolean mask of {n} entries, not {mask.dtype} {mask.shape}")
    return np.flatnonzero(mask).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def time_groups(order, ant1, ant2, field, scan, time, interval, rate, wgt):
    """Runs of integrations of one baseline that average_groups may join: the rows in
    `order` (sorted by baseline, field, scan, time) cut where the baseline, field or scan
    changes, where a row's flagged channels (wgt == 0) differ from the run's first row's
    (so that a run's channels all average the same integrations, and the run's one uvw
    is where each channel's data are), and where the run would span more than
    1 / rate seconds (rate: of the run's first row, the phase that a second of its uv
    point's move sweeps at the image's corner, per unit of the tolerance; a gap in time
    counts in the span). Returns the start of each run in `order`, and len(order) at the
    end."""
    n = len(order)
    nchan = wgt.shape[1]
    starts = np.empty(n + 1, np.int64)
    starts[0] = 0
    if n == 0:
        return starts[:1]
    ng = 1
    first = order[0]
    for k in range(1, n):
        r = order[k]
        new = ant1[r] != ant1[first] or ant2[r] != ant2[first] or field[r] != field[first] \
            or scan[r] != scan[first]
        if not new:
            span = time[r] + 0.5 * interval[r] - time[first] + 0.5 * interval[first]
            new = not (span * rate[first] <= 1.0)          # (NaN: not joined)
        if not new:
            for c in range(nchan):
                if (wgt[r, c] > 0) != (wgt[first, c] > 0):
                    new = True
                    break
        if new:
            starts[ng] = k
            ng += 1
            first = r
    starts[ng] = n
    return starts[:ng + 1]


@numba.njit(cache=True, nogil=True)
def average_groups(order, starts, uvw, vis, wgt):
    """Each run of rows (order[starts[g]:starts[g + 1]]) as one sample: uvw the mean of
    its rows' weighted by their weight (summed over channels), vis per channel the
    weighted mean of its values, wgt per channel the sum of the weights (the run's rows
    share their flagged channels, time_groups). Returns (uvw (ng, 3), vis (ng, nchan)
    complex64, wgt (ng, nchan) float32)."""
    ng = len(starts) - 1
    nchan = vis.shape[1]
    uvw_out = np.zeros((ng, 3))
    vis_out = np.zeros((ng, nchan), np.complex64)
    wgt_out = np.zeros((ng, nchan), np.float32)
    for g in range(ng):
        a, b = starts[g], starts[g + 1]
        wrow_sum = 0.0
        for k in range(a, b):
            r = order[k]
            wrow = 0.0
            for c in range(nchan):
                w = wgt[r, c]
                if w > 0:
                    vis_out[g, c] += w * vis[r, c]
                    wgt_out[g, c] += w
                    wrow += w
            for i in range(3):
                uvw_out[g, i] += wrow * uvw[r, i]
            wrow_sum += wrow
        for i in range(3):
            uvw_out[g, i] /= max(wrow_sum, 1e-300)
        for c in range(nchan):
            if wgt_out[g, c] > 0:
                vis_out[g, c] /= wgt_out[g, c]
    return uvw_out, vis_out, wgt_out
