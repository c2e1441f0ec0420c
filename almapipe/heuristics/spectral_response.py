"""The noise of channels that are not independent.

ALMA's correlator smooths every spectrum (Hanning, by default) and may then average N
channels online, so neighbouring channels share noise. The spw's EFFECTIVE_BW / CHAN_WIDTH
says which: 2.667 unaveraged, 1.600, 1.231, 1.104 and 1.049 for N = 2, 4, 8 and 16 (the
ratios the ALMA pipeline recognises). A ratio of 1, or one of no such setup (the VLA, a
simulator, UVFITS without it), means independent channels.

Two things go wrong if correlated channels are taken as independent, and both are fixed
with the correlation rho_k of channels k apart:
* noise measured from differences of adjacent channels comes out low, by sqrt(1 - rho_1)
  (sqrt(1/3) unaveraged): difference_scale undoes it;
* an average of M channels is noisier than sigma / sqrt(M), by the square root of
  mean_variance_factor (sqrt(8/3) for a wide unaveraged selection: the effective
  bandwidth of a channel is then its width, not 2.667 of it).
"""
from __future__ import annotations

import numpy as np

HANNING = np.array([0.25, 0.5, 0.25])
EBW_RATIO_OF_ONLINE_AVERAGING = {1: 2.667, 2: 1.600, 4: 1.231, 8: 1.104, 16: 1.049}


def online_averaging(chan_width_hz: float, effective_bw_hz: float | None) -> int | None:
    """The online averaging factor N of a Hanning-smoothed spw, from its channels' effective
    bandwidth over their width; None where the channels are independent or unrecognised."""
    if not chan_width_hz or not effective_bw_hz:
        return None
    ratio = abs(effective_bw_hz / chan_width_hz)
    return next((n for n, r in EBW_RATIO_OF_ONLINE_AVERAGING.items() if abs(ratio / r - 1) < 1e-3), None)


def channel_correlation(chan_width_hz: float, effective_bw_hz: float | None) -> np.ndarray:
    """rho[k - 1]: the noise correlation of channels k apart (empty: independent). A
    channel averages N of the correlator's channels after Hanning smoothing, so it is
    white noise weighted by box(N) * [1/4, 1/2, 1/4] / N; channels k apart share the
    weights N k samples apart."""
    n = online_averaging(chan_width_hz, effective_bw_hz)
    if n is None:
        return np.zeros(0)
    c = np.convolve(np.ones(n) / n, HANNING)
    lags = range(1, (len(c) - 1) // n + 1)
    return np.array([np.dot(c[:-k * n], c[k * n:]) for k in lags]) / np.dot(c, c)


def difference_scale(rho: np.ndarray) -> float:
    """The channel noise over the noise that differences of adjacent channels imply
    (those differences are sqrt(2 (1 - rho_1)) sigma, not sqrt(2) sigma)."""
    return float(1.0 / np.sqrt(1.0 - rho[0])) if len(rho) else 1.0


def mean_variance_factor(chans: np.ndarray, rho: np.ndarray) -> float:
    """The variance of the mean of the channels chans (indices, or a mask), over what it would be were
    they independent: 1 + 2 sum_k rho_k pairs_k / M, pairs_k the channels of the selection
    whose k-th neighbour is selected too."""
    chans = np.asarray(chans)
    idx = np.flatnonzero(chans) if chans.dtype == bool else np.unique(chans.astype(np.int64))
    if not len(rho) or len(idx) < 2:
        return 1.0
    mask = np.zeros(int(idx[-1]) + 1, bool)
    mask[idx] = True
    pairs = [int((mask[:-k] & mask[k:]).sum()) for k in range(1, len(rho) + 1) if k < len(mask)]
    return float(1.0 + 2.0 * np.dot(rho[:len(pairs)], pairs) / len(idx))


def contiguous_mean_variance_factor(n: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """mean_variance_factor of runs of n adjacent channels, for an array of n."""
    n = np.asarray(n, float)
    out = np.ones_like(n)
    for k, r in enumerate(rho, start=1):
        out += 2.0 * r * np.clip(n - k, 0, None) / np.maximum(n, 1)
    return out


def noise_from_differences(chans: np.ndarray, rho: np.ndarray) -> float:
    """What an image noise computed from adjacent channels' differences, with the
    channels chans taken as independent, is multiplied by for correlated channels."""
    return difference_scale(rho) * float(np.sqrt(mean_variance_factor(chans, rho)))


def channel_noise_note(spw, chan_width_hz: float, effective_bw_hz: float | None) -> str | None:
    """What a WebLog says of a spw's channels where they are not plainly independent: the
    online averaging recognised and the correlation taken, or a ratio of effective
    bandwidth to width that is none of ALMA's (channels then taken as independent, as the
    ALMA pipeline takes them, with a warning)."""
    if not chan_width_hz or not effective_bw_hz:
        return None
    ratio = abs(effective_bw_hz / chan_width_hz)
    n = online_averaging(chan_width_hz, effective_bw_hz)
    if n is not None:
        rho = channel_correlation(chan_width_hz, effective_bw_hz)
        return (f"spw {spw}: channels Hanning-smoothed (EFFECTIVE_BW {ratio:.3f} widths, online averaging {n}); "
                f"the theoretical noise takes neighbours' noise as correlated by {rho[0]:.2f}.")
    if ratio > 1.001:
        known = ", ".join(f"{r:.3f}" for r in EBW_RATIO_OF_ONLINE_AVERAGING.values())
        return (f"spw {spw}: EFFECTIVE_BW is {ratio:.3f} channel widths, none of ALMA's Hanning setups ({known}); "
                "its channels' noise is taken as independent, so the theoretical noise may be low.")
    return None
