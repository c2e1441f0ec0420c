"""Channel heuristics and selections shared by the calibration and flagging stages."""
from __future__ import annotations

import numpy as np

from ..imaging.uvcontsub import parse_channels
from .robust import robust_sigma


def chan_selection(spec: str | None, nchan: int) -> np.ndarray:
    """A CASA channel selection ('0:6~56') as a mask of nchan; empty: every channel."""
    return parse_channels(spec, nchan) if spec else np.ones(nchan, bool)


def spike_channels(spec: np.ndarray, good: np.ndarray, nsigma: float) -> np.ndarray:
    """Channels of a smooth spectrum that jump away from their neighbours: the
    robust second difference (MAD x 1.4826) beyond nsigma, found one channel at a
    time, worst first. A spike also raises its neighbours' second difference (by
    half), which vanishes once the spike itself is left out; a bandpass or a Tsys
    spectrum is smooth, a birdie or a bad correlator channel is not."""
    bad = np.zeros(len(spec), bool)
    if good.sum() < 5:
        return bad

    def second_difference(idx):
        a = spec[idx]
        d2 = np.zeros_like(a)
        d2[1:-1] = a[1:-1] - 0.5 * (a[:-2] + a[2:])
        return d2

    idx = np.flatnonzero(good)
    d2 = second_difference(idx)
    sigma = robust_sigma(d2[1:-1]) or 1e-30
    for _ in range(max(1, len(spec) // 10)):
        d2 = second_difference(idx)
        k = int(np.argmax(np.abs(d2)))
        if abs(d2[k]) <= nsigma * sigma:
            break
        bad[idx[k]] = True
        idx = np.delete(idx, k)
    return bad
