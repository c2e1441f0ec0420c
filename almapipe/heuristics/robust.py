"""Robust statistics: the median absolute deviation scaled to a Gaussian's sigma
(as astropy.stats.mad_std), one implementation for every stage and kernel."""
from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1.482602218505602         # astropy's mad_std factor: 1 / Phi^-1(3/4)


def mad_std(values, axis=None) -> np.ndarray | float:
    """MAD x 1.4826 about the median (along axis), as astropy.stats.mad_std computes
    it for a plain array (a masked array's mask is not honoured; NaN propagates); here
    in numpy, because importing astropy.stats takes a quarter of a second in every
    process that cleans an image."""
    v = np.asarray(values)
    med = np.median(v, axis=axis, keepdims=True)
    return MAD_TO_SIGMA * np.median(np.abs(v - med), axis=axis)


def robust_rms(values: np.ndarray) -> float:
    """The noise of an image or residual from its finite values: MAD x 1.4826, which a
    source occupying a minority of the pixels does not raise."""
    v = np.asarray(values)
    v = v[np.isfinite(v)]
    return float(mad_std(v)) if v.size else 0.0


def robust_sigma(values, floor: float = 0.0) -> float:
    """The robust sigma of a sample (MAD x 1.4826), never below floor (a sample whose
    values are mostly equal has a MAD of 0)."""
    s = float(mad_std(np.asarray(values)))
    return max(s, floor) if floor else s


def robust_centre_sigma(values, floor: float = 0.0) -> tuple[float, float]:
    """(median, robust sigma) of a sample, the sigma not below floor."""
    return float(np.median(values)), robust_sigma(values, floor)
