"""Outlier tests of gainflag and flagtargets as pure functions on arrays: antennas whose
gains stand out from the array's (gain_outliers), and calibrated target amplitudes that
are outliers in their uv-distance bins (uv_outliers, and its per-channel part for a
caller that reads in channel slices)."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .kernels import bin_outliers
from .robust import robust_centre_sigma
from ..calibration.caltable import CalSolutions
from ..msio.ms import unique_rows


def _robust(x: np.ndarray, floor: float) -> tuple[float, float]:
    return robust_centre_sigma(x, floor)


def relative_amplitudes(g: CalSolutions) -> np.ndarray:
    """(nrow, ncorr) gain amplitudes divided by the array's median at the same time,
    field and correlation (NaN where flagged): what gain_outliers tests and the plot shows."""
    amp = np.where(g.flag[:, 0, :], np.nan, np.abs(g.cparam[:, 0, :]))       # (nrow, ncorr)
    rel = np.full_like(amp, np.nan)
    _, slot = unique_rows(np.asarray(g.time, np.float64), np.asarray(g.field_id, np.float64))
    for s in np.unique(slot):
        r = slot == s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # a time with all gains flagged
            med = np.nanmedian(amp[r], axis=0)
        if np.isfinite(med).any():
            rel[r] = amp[r] / med
    return rel


def gain_outliers(g: CalSolutions, nsigma: float = 4.0, min_factor: float = 2.0,
                  rms_factor: float = 3.0, nsigma_rms: float = 6.0) -> dict:
    """Antennas whose gains stand out, with the reason: antenna id -> text.

    Amplitudes are first divided by the array's median at the same time, field and
    correlation (so a field's model flux and the atmosphere drop out). Per antenna:
    m = the median of these ratios, r = their rms about m, relative to m. An
    antenna is an outlier when log m differs from the array's median of log m by more than
    nsigma robust sigmas (1.4826 MAD) and by more than a factor min_factor (a small
    array's antennas differ by 10-30 %, which calibration handles), or when r
    exceeds the array's median r by nsigma_rms sigmas and is rms_factor times it, and is
    rms_factor times the scatter the solutions' SNR explains (an antenna seeing a weak
    calibrator at low SNR scatters, and is not broken)."""
    rel = relative_amplitudes(g)
    snr = np.where(g.flag[:, 0, :], np.nan, g.snr[:, 0, :])
    med_a, rms_a, chi_a = {}, {}, {}
    for a in np.unique(g.antenna):
        mine = g.antenna == a
        ok = np.isfinite(rel[mine]) & np.isfinite(snr[mine]) & (snr[mine] > 0)
        x, s = rel[mine][ok], snr[mine][ok]
        if len(x):
            med_a[int(a)] = float(np.median(x))
            rms_a[int(a)] = float(np.sqrt(np.mean((x - med_a[int(a)]) ** 2)) / max(med_a[int(a)], 1e-12))
            # the scatter the solutions' own noise explains: an amplitude of SNR s scatters
            # by about 1/s; on a weak calibrator that is ten per cent and more per integration
            chi_a[int(a)] = float(np.sqrt(np.mean(((x - med_a[int(a)]) / max(med_a[int(a)], 1e-12) * s) ** 2)))
    if len(med_a) < 4:                     # too few antennas to say which is odd
        return {}
    out = {}
    # gains are factors: compared in log, a third and three times are equally odd
    logs = {a: np.log(max(m, 1e-6)) for a, m in med_a.items()}
    centre, sigma = _robust(np.array(list(logs.values())), 0.01)
    for a, lm in logs.items():
        ratio = float(np.exp(lm - centre))
        if abs(lm - centre) > nsigma * sigma and abs(lm - centre) > np.log(min_factor):
            out[a] = f"median gain {ratio:.2f} x the array's"
    rc, rs = _robust(np.array(list(rms_a.values())), 0.005)
    for a, r in rms_a.items():
        if a not in out and r > rc + nsigma_rms * rs and r > rms_factor * rc and chi_a[a] > rms_factor:
            out[a] = f"gain amplitude scatter {r:.1%} vs the array's {rc:.1%}"
    return out


STATS_ROWS = 20000      # _bin_outliers: the rows of a bin its statistics are taken from


def _bin_outliers(amp: np.ndarray, ok: np.ndarray, bins: np.ndarray, nbin: int, nhi: float, nlo: float,
                  min_samples: int) -> np.ndarray:
    """Samples (nrow, nchan, ncorr) beyond the thresholds of their bin, per channel and
    correlation: above median + nhi sigma or below median - nlo sigma. The bin's median
    and MAD come from at most STATS_ROWS of its rows, evenly spaced: the thresholds of
    20,000 samples are within a per cent of those of all, and a bin of a long EB's
    target holds hundreds of thousands of rows per channel. Compiled: numpy's sorts
    along the rows and its masked copies of each bin took 17 s of flagtargets' CPU on
    the realistic EB (py-spy), a selection in linear time a fraction of it."""
    return bin_outliers(np.ascontiguousarray(amp, np.float32), np.ascontiguousarray(ok, np.bool_),
                        np.ascontiguousarray(bins, np.int64), int(nbin), float(nhi), float(nlo),
                        int(min_samples), int(STATS_ROWS))


def uv_bins(uvdist: np.ndarray, nbin: int) -> tuple[np.ndarray, np.ndarray]:
    """The two overlapping sets of uv-distance bins of equal counts (uv_outliers): each
    row's bin in the first set (nbin bins) and in the second, shifted by half a bin."""
    nrow = len(uvdist)
    rank = np.empty(nrow, np.int64)
    rank[np.argsort(uvdist, kind="stable")] = np.arange(nrow)
    width = nrow / nbin
    first = np.minimum((rank / width).astype(int), nbin - 1)
    # the shifted set: half-width bins at either end join their neighbour, so no bin is thin
    second = np.clip(((rank + width / 2) / width).astype(int), 1, nbin - 1) - 1
    return first, second


def channel_outliers(amp: np.ndarray, ok: np.ndarray, first: np.ndarray, second: np.ndarray, nbin: int,
                     nhi: float, nlo: float, min_samples: int) -> np.ndarray:
    """Samples that are outliers in both uv bins that hold them. Every statistic is per
    channel and correlation, so any slice of channels gives the same answer as the whole.
    The two sets of bins are tested at once, one in a thread: their numpy (sorts, masks)
    releases the GIL, and flagtargets had a core idle through this part."""
    with ThreadPoolExecutor(1, thread_name_prefix="uv-bins") as other:
        shifted = other.submit(_bin_outliers, amp, ok, second, nbin - 1, nhi, nlo, min_samples)
        return _bin_outliers(amp, ok, first, nbin, nhi, nlo, min_samples) & shifted.result()


def uv_outliers(amp: np.ndarray, flag: np.ndarray, uvdist: np.ndarray, nhi: float = 12.0, nlo: float = 13.0,
                nbin: int = 10, min_samples: int = 20, row_fraction: float = 0.5) -> np.ndarray:
    """Outlier samples of one field's calibrated amplitudes (nrow, nchan, ncorr) against
    uv distance (m): rows are cut into nbin bins of equal counts,
    and again into bins shifted by half a bin, so every sample lies in two bins; it
    is an outlier when it is one in both. A row with more than row_fraction of its
    unflagged samples outliers is flagged whole (a burst spoils all channels)."""
    ok = ~flag
    if len(uvdist) < 2 * min_samples:
        return np.zeros(flag.shape, bool)
    first, second = uv_bins(uvdist, nbin)
    out = channel_outliers(amp, ok, first, second, nbin, nhi, nlo, min_samples)
    frac = out.sum(axis=(1, 2)) / np.maximum(ok.sum(axis=(1, 2)), 1)
    out[frac > row_fraction] = True
    return out & ok
