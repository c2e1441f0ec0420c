"""Compiled kernels of the flagging heuristics (numba): loops that numpy would run as
sorts and masked copies of whole arrays."""
from __future__ import annotations

import numba
import numpy as np

from .robust import MAD_TO_SIGMA


@numba.njit(cache=True, nogil=True)
def _select(a, n, k):
    """The k-th smallest (0-based) of a[:n], which it reorders so that a[:k] are all
    not above it (Hoare's selection: linear time, where a sort is n log n)."""
    left, right = 0, n - 1
    while right > left:
        mid = (left + right) // 2                 # median of three as the pivot
        if a[mid] < a[left]:
            a[mid], a[left] = a[left], a[mid]
        if a[right] < a[left]:
            a[right], a[left] = a[left], a[right]
        if a[right] < a[mid]:
            a[right], a[mid] = a[mid], a[right]
        pivot = a[mid]
        i, j = left, right
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            right = j
        elif k >= i:
            left = i
        else:                                     # between j and i: equal to the pivot
            return a[k]
    return a[k]


@numba.njit(cache=True, nogil=True)
def _median(a, n):
    """The median of a[:n] (n > 0), as numpy takes it: the mean of the two middle values
    of an even count, in float32 arithmetic. Reorders a[:n]."""
    hi = n // 2
    x = _select(a, n, hi)
    if n % 2:
        return x
    lo = a[0]                                     # the largest of a[:hi]: the other middle value
    for i in range(1, hi):
        if a[i] > lo:
            lo = a[i]
    return np.float32(0.5) * (lo + x)


@numba.njit(cache=True, nogil=True)
def bin_outliers(amp, ok, bins, nbin, nhi, nlo, min_samples, stats_rows):
    """Samples (nrow, nchan, ncorr) beyond the thresholds of their bin, per channel and
    correlation: above median + nhi sigma or below median - nlo sigma, sigma the MAD x
    1.4826. The median and MAD are those of the bin's unflagged finite values in at most
    stats_rows of its rows, evenly spaced (every ceil(rows / stats_rows)-th); a channel
    and correlation with fewer than min_samples unflagged samples in the bin, or a MAD
    of 0, is not tested. amp: float32; bins: each row's bin, rows outside 0..nbin-1 in
    none. What np.nanmedian and numpy's masks of each bin compute, in linear time."""
    nrow, nchan, ncorr = amp.shape
    ncol = nchan * ncorr
    flat_amp, flat_ok = amp.reshape(nrow, ncol), ok.reshape(nrow, ncol)     # (C order: views)
    out = np.zeros((nrow, ncol), np.bool_)
    # the rows of each bin, in row order (a counting sort)
    start = np.zeros(nbin + 1, np.int64)
    for i in range(nrow):
        b = bins[i]
        if 0 <= b < nbin:
            start[b + 1] += 1
    for b in range(nbin):
        start[b + 1] += start[b]
    order = np.empty(start[nbin], np.int64)
    fill = start[:nbin].copy()
    for i in range(nrow):
        b = bins[i]
        if 0 <= b < nbin:
            order[fill[b]] = i
            fill[b] += 1
    f_hi, f_lo, f_mad = np.float32(nhi), np.float32(nlo), np.float32(MAD_TO_SIGMA)
    n_ok = np.zeros(ncol, np.int64)
    count = np.zeros(ncol, np.int64)
    upper = np.empty(ncol, np.float32)
    lower = np.empty(ncol, np.float32)
    tested = np.zeros(ncol, np.bool_)
    for b in range(nbin):
        rows = order[start[b]:start[b + 1]]
        m = len(rows)
        if m == 0:
            continue
        n_ok[:] = 0
        for s in range(m):                    # branch-free: the compiler vectorises it
            row_ok = flat_ok[rows[s]]
            for col in range(ncol):
                n_ok[col] += row_ok[col]
        # the sampled values column by column (contiguous for the selection)
        step = max(1, (m + stats_rows - 1) // stats_rows)
        values = np.empty((ncol, (m + step - 1) // step), np.float32)
        count[:] = 0
        for s in range(0, m, step):
            r = rows[s]
            for col in range(ncol):
                v = flat_amp[r, col]
                if flat_ok[r, col] and not np.isnan(v):
                    values[col, count[col]] = v
                    count[col] += 1
        for col in range(ncol):
            n = count[col]
            tested[col] = False
            if n == 0:
                continue
            v = values[col]
            med = _median(v, n)
            for i in range(n):
                v[i] = abs(v[i] - med)
            sig = f_mad * _median(v, n)
            tested[col] = n_ok[col] >= min_samples and sig > 0
            upper[col] = med + f_hi * sig
            lower[col] = med - f_lo * sig
        for s in range(m):
            r = rows[s]
            row_amp, row_ok, row_out = flat_amp[r], flat_ok[r], out[r]
            for col in range(ncol):
                v = row_amp[col]
                row_out[col] = tested[col] & row_ok[col] & ((v > upper[col]) | (v < lower[col]))
    return out.reshape(nrow, nchan, ncorr)
