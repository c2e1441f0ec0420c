"""Image heuristics as hif_makeimlist and hif_makeimages take them: cell and image size
from the uv coverage and the primary beam, and the cleaning threshold raised for
dynamic range."""
from __future__ import annotations

import numpy as np

from ..imaging import gridding
from ..imaging.products import pb_fwhm
from ..msio import ms as msio


def image_heuristics(vis: msio.Vis, dish_m: float, telescope: str, chans: np.ndarray,
                     extent_rad: float = 0.0) -> tuple[float, int]:
    """(cell arcsec, npix): 5 pixels across the beam, image covering the primary
    beam down to 0.2 of its peak, rounded up to a fast FFT size (hif_makeimlist).
    A mosaic's image covers every pointing's beam to 0.2: extent_rad is its
    pointings' largest distance from the image centre."""
    cross = (vis.ant1 != vis.ant2) & ~vis.flag[:, chans].all(axis=(1, 2))
    return uv_heuristics(np.hypot(vis.uvw[cross, 0], vis.uvw[cross, 1]), vis.freq[chans], dish_m, telescope,
                         extent_rad)


def uv_heuristics(uvdist_m: np.ndarray, freq: np.ndarray, dish_m: float, telescope: str,
                  extent_rad: float = 0.0) -> tuple[float, int]:
    """image_heuristics from the uv distances (m) of the cross-correlation rows with
    data and the frequencies of the channels imaged."""
    fmax = freq.max()
    uvmax = np.percentile(uvdist_m, 95) * fmax / 299792458.0
    beam_arcsec = np.degrees(1.0 / max(uvmax, 1e-9)) * 3600 * 1.0
    cell = float(np.round(beam_arcsec / 5.0, 3 if beam_arcsec < 1 else 2))
    fwhm = pb_fwhm(freq.min(), dish_m, telescope)
    radius = fwhm * np.sqrt(np.log(5.0) / (4 * np.log(2)))   # where a Gaussian beam falls to 0.2
    npix = gridding.good_size(int(np.ceil(2 * np.degrees(radius + extent_rad) * 3600 / cell)))
    return cell, npix


def dr_correction(theoretical_rms: float, dirty_peak: float, calibrator: bool, dish_m: float,
                  tlimit: float = 2.0) -> tuple[float, float]:
    """The cleaning threshold from the theoretical noise, raised for dynamic range
    as the ALMA pipeline does (hif_makeimages' DR heuristic). Returns (threshold in
    Jy/beam, correction factor).

    The dirty dynamic range is dirty peak / theoretical rms. Targets (12 m): up to
    20 the threshold is tlimit x rms; above, x1.5 (20-50), x2 (50-100), x2.5 (100-150);
    beyond 150 at least the dirty peak / 150 (times tlimit). For 7 m dishes the steps
    are 4, 10, 20 and the limit 30. Calibrators are dynamic-range limited: at least
    dirty peak / 1000 (200 for 7 m), times tlimit."""
    base = tlimit * theoretical_rms
    if base <= 0:
        return 0.0, 1.0
    dr = dirty_peak / theoretical_rms
    aca = dish_m < 10.0
    if calibrator:
        new = max(base, dirty_peak / (200.0 if aca else 1000.0) * tlimit)
    else:
        steps, max_edr = ((4.0, 10.0, 20.0), 30.0) if aca else ((20.0, 50.0, 100.0), 150.0)
        if dr > max_edr:
            new = max(2.5 * base, dirty_peak / max_edr * tlimit)
        else:
            new = base * (1.0 if dr <= steps[0] else 1.5 if dr <= steps[1] else 2.0 if dr <= steps[2] else 2.5)
    return new, new / base
