"""Compiled inner loops of calibration (numba): one pass over the visibilities."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def inverse_gains(gain):
    """1 / g of every gain, 0 where g is 0 (a flagged solution's gain is stored as zero),
    computed in float64 (|g|^2 does not underflow). Dividing a sample by g[a1] conj(g[a2])
    is then two multiplications (_corrected): the division per sample made correcting
    on reading 2.7x slower, and it ran on every read of CORRECTED_DATA (some 20 GB a
    run of the realistic EB in the imager alone)."""
    inv = np.zeros_like(gain)
    g = gain.ravel()
    out = inv.ravel()
    for k in range(g.size):
        gr, gi = np.float64(g[k].real), np.float64(g[k].imag)
        m = gr * gr + gi * gi
        if m != 0:
            out[k] = complex(gr / m, -gi / m)
    return inv


@numba.njit(inline="always")
def _corrected(d, inv1, inv2):
    """d / (g1 conj(g2)) from the inverses of g1 and g2 (inverse_gains). apply_gains and
    divide_by_gains share it, so that data corrected on reading equal those applycal
    stores."""
    return d * (inv1 * np.conj(inv2))


@numba.njit(parallel=True, cache=True, fastmath=False)
def apply_gains(data, flag, weight, pidx, ant1, ant2, gain, wfac, bad, divide=True):
    """In place, for every row r, channel c, correlation p:
    data /= g[a1] conj(g[a2]) (unless not `divide`: applycal's flags and weights alone,
    its data corrected on reading, divide_by_gains); flag where a gain is missing or
    zero; weight[r, p] *= mean over channels of wfac[a1] wfac[a2] (calwt)."""
    nrow, nchan, ncorr = flag.shape
    inv = inverse_gains(gain) if divide else gain
    for r in numba.prange(nrow):
        t = pidx[r]
        i = ant1[r]
        j = ant2[r]
        for p in range(ncorr):
            wsum = 0.0
            for c in range(nchan):
                g = gain[t, i, c, p] * np.conj(gain[t, j, c, p])
                wsum += wfac[t, i, c, p] * wfac[t, j, c, p]
                if bad[t, i, c, p] or bad[t, j, c, p] or g == 0:
                    flag[r, c, p] = True
                elif divide:
                    data[r, c, p] = _corrected(data[r, c, p], inv[t, i, c, p], inv[t, j, c, p])
            weight[r, p] = weight[r, p] * (wsum / nchan)


@numba.njit(parallel=False, cache=True, fastmath=False, nogil=True)
def divide_by_gains(data, pidx, ant1, ant2, gain):
    """In place: data[r, c, p] /= g[a1] conj(g[a2]) where neither gain is zero (the
    gains of flagged solutions are stored as zero: those samples are flagged and left
    as they are), the same arithmetic as apply_gains, so that visibilities corrected on
    reading equal those applycal would have stored. One thread: it runs in the
    read-ahead thread of VisPartition.blocks beside the stage's own kernels, which
    numba's workqueue threading layer (no OpenMP or TBB) does not allow for parallel ones.
    Without the GIL, so that the stage's own Python runs beside it (its caller owns
    `data`, a fresh copy, so no other thread writes it)."""
    nrow, nchan, ncorr = data.shape
    inv = inverse_gains(gain)
    for r in range(nrow):
        t = pidx[r]
        inv1 = inv[t, ant1[r]]
        inv2 = inv[t, ant2[r]]
        for c in range(nchan):
            for p in range(ncorr):
                if inv1[c, p] != 0 and inv2[c, p] != 0:
                    data[r, c, p] = _corrected(data[r, c, p], inv1[c, p], inv2[c, p])


@numba.njit(parallel=False, cache=True)
def average_channels(data, flag, weight, model, use_chan):
    """Per row and correlation, over the used channels: the weighted mean of V / M with
    weights w |M|^2, and that weight's sum; accumulate_slots sums exactly these for a
    solve with one gain over the channels (G, T), so a one-channel Vis of them solves
    the same. Returns (mean (nrow, 1, ncorr) complex128, weight sum (nrow, ncorr))."""
    nrow, nchan, ncorr = data.shape
    mean = np.zeros((nrow, 1, ncorr), np.complex128)
    wsum = np.zeros((nrow, ncorr), np.float64)
    for r in range(nrow):
        for p in range(ncorr):
            w = weight[r, p]
            if w <= 0:
                continue
            acc = 0j
            ws = 0.0
            for c in range(nchan):
                if not use_chan[c] or flag[r, c, p]:
                    continue
                m = model[r, c]
                if m == 0.0:
                    continue
                wm = w * m * m
                acc += wm * (data[r, c, p] / m)
                ws += wm
            if ws > 0:
                mean[r, 0, p] = acc / ws
                wsum[r, p] = ws
    return mean, wsum


@numba.njit(parallel=False, cache=True)
def accumulate_slots(data, flag, weight, model, use_chan, tbin, cgroup, corr_slot, ant1, ant2,
                     ncg, ncs, nslot, nant):
    """Sum weighted visibility/model ratios into per-slot baseline matrices in one pass.

    slot = (tbin[r] * ncg + cgroup[c]) * ncs + corr_slot[p]; a sample contributes
    w |M|^2 (V / M) to X[slot, a1, a2] and its conjugate to X[slot, a2, a1], and
    w |M|^2 to W at both. Returns X (weighted mean ratio) and W."""
    xs = np.zeros((nslot, nant, nant), np.complex128)
    ws = np.zeros((nslot, nant, nant), np.float64)
    nrow, nchan, ncorr = data.shape
    for r in range(nrow):
        i = ant1[r]
        j = ant2[r]
        if i == j:
            continue
        base = tbin[r] * ncg
        for c in range(nchan):
            if not use_chan[c]:
                continue
            m = model[r, c]
            if m == 0.0:
                continue
            for p in range(ncorr):
                w = weight[r, p]
                if flag[r, c, p] or w <= 0:
                    continue
                s = (base + cgroup[c]) * ncs + corr_slot[p]
                wm = w * m * m
                v = data[r, c, p] / m
                xs[s, i, j] += wm * v
                xs[s, j, i] += wm * np.conj(v)
                ws[s, i, j] += wm
                ws[s, j, i] += wm
    for s in range(nslot):
        for i in range(nant):
            for j in range(nant):
                if ws[s, i, j] > 0:
                    xs[s, i, j] /= ws[s, i, j]
    return xs, ws


@numba.njit(parallel=True, cache=True)
def row_ratio_statistics(data, flag, model, ant1, ant2):
    """Per cross-correlation row and correlation, over the channels where the sample is
    unflagged and the model non-zero (good): the number of good channels, |mean of
    V / M|, and the median of |r[c+1] - r[c]|^2 over adjacent good pairs (NaN where
    there is none). terms.row_snr2's statistics, in one pass without temporaries.
    Returns (n (nrow, ncorr) int64, signal (nrow, ncorr), median (nrow, ncorr))."""
    nrow, nchan, ncorr = data.shape
    n = np.zeros((nrow, ncorr), np.int64)
    signal = np.zeros((nrow, ncorr), np.float64)
    median = np.full((nrow, ncorr), np.nan)
    for r in numba.prange(nrow):
        if ant1[r] == ant2[r]:
            continue
        diffs = np.empty(max(nchan - 1, 1), np.float64)
        for p in range(ncorr):
            acc = 0j
            count = 0
            k = 0
            prev = 0j
            prev_good = False
            for c in range(nchan):
                m = model[r, c]
                good = (not flag[r, c, p]) and m != 0
                if good:
                    v = data[r, c, p] / m
                    acc += v
                    count += 1
                    if prev_good:
                        diffs[k] = abs(v - prev) ** 2
                        k += 1
                    prev = v
                prev_good = good
            n[r, p] = count
            signal[r, p] = abs(acc) / max(count, 1)
            if k > 0:
                median[r, p] = np.median(diffs[:k])
    return n, signal, median
