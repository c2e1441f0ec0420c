"""Robust statistics: the median absolute deviation scaled to a Gaussian's sigma
(astropy.stats.mad_std), one implementation for every stage and kernel."""
from __future__ import annotations

import numpy as np
from astropy.stats import mad_std


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
