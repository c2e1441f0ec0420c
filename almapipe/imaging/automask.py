"""Automatic clean masks in the spirit of CASA's auto-multithresh.

Each major cycle: a new mask of the residual above max(sidelobe_threshold x
sidelobe level x peak, noise_threshold x rms), the sidelobe term capped at half
the peak (unlike CASA: with a sparse array's sidelobes near 0.5 it would exceed
the peak and nothing would ever be masked or cleaned); regions smaller than
min_beam_frac of a beam are pruned; the previous mask is grown by binary
dilation into emission above low_noise_threshold x rms; the result is the
union of the grown and the new masks. With negative_threshold > 0, regions of
the residual below -max(negative_threshold x rms, the sidelobe term) (absorption)
are masked too, as auto-multithresh does for cubes. Defaults are the ALMA 12-m
values for continuum (cubes: negative_threshold 15).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..heuristics.robust import robust_rms
from .mask_kernels import grow_within, region_sizes


@dataclass
class AutomaskParams:
    sidelobe_threshold: float = 2.0
    noise_threshold: float = 4.25
    low_noise_threshold: float = 1.5
    min_beam_frac: float = 0.3
    grow_iterations: int = 75
    negative_threshold: float = 0.0


def prune(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop connected (4-connected) regions smaller than min_pixels."""
    return region_sizes(np.ascontiguousarray(mask, bool)) >= max(min_pixels, 1)


def update_mask(residual: np.ndarray, previous: np.ndarray | None, sidelobe: float, beam_pixels: float,
                p: AutomaskParams = AutomaskParams()) -> np.ndarray:
    rms = robust_rms(residual)
    peak = float(np.abs(residual).max())
    threshold = max(min(p.sidelobe_threshold * sidelobe, 0.5) * peak, p.noise_threshold * rms)
    new = prune(residual > threshold, p.min_beam_frac * beam_pixels)
    if p.negative_threshold > 0:
        below = -max(p.negative_threshold * rms, min(p.sidelobe_threshold * sidelobe, 0.5) * peak)
        new |= prune(residual < below, p.min_beam_frac * beam_pixels)
    if previous is None or not previous.any():
        return new
    previous = previous > 0
    low = (np.abs(residual) if p.negative_threshold > 0 else residual) > p.low_noise_threshold * rms
    grown = grow_within(np.ascontiguousarray(previous), low | previous, p.grow_iterations)
    grown = prune(grown, p.min_beam_frac * beam_pixels) | previous
    return grown | new
