"""Spectral reference frames: the ALMA correlator records TOPO frequencies; the
pipeline's cubes and cont.dat are in LSRK, as the ALMA pipeline writes them.

The TOPO-to-LSRK shift drifts with the Earth's rotation by up to ~2 m/s per
minute (~100 m/s in an hour): less than a TDM channel (20 km/s at 230 GHz) but
several of the finest FDM channels. cont.dat and the cubes' axes are labelled
with the shift at the mean time of a field's data (checked against CASA's
measures to 1e-9), and a cube's rows are moved onto that LSRK grid one by one
(lsrk_factors, kernels.shift_spectra), as tclean grids TOPO data into an LSRK
cube. A run holds one execution block: blocks of different days are not
combined.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
from astropy import units as u
from astropy.coordinates import EarthLocation, SkyCoord, SpectralCoord
from astropy.time import Time
from scipy.interpolate import CubicSpline


# one conversion at a time in a process: the first loads astropy's Earth-orientation
# table, which warm_up may be loading in a thread of its own
_CONVERTING = threading.Lock()


def warm_up() -> None:
    """Load what the first conversion of a process loads (astropy's Earth-orientation
    table: 1.5-2 s), so that an imager worker does it while it waits for work, not in
    its first cube's join."""
    lsrk_factor("TOPO", 5.0e9, 0.0, -0.4, (2225142.18, -5440307.37, -2481029.85))


def topo_to_lsrk(freq_hz: np.ndarray, time_mjd_s: float, ra_rad: float, dec_rad: float,
                 observatory_itrf_m) -> np.ndarray:
    """TOPO frequencies seen from the observatory at a time, towards (ra, dec) ICRS,
    as LSRK frequencies."""
    with _CONVERTING:
        return _topo_to_lsrk(freq_hz, time_mjd_s, ra_rad, dec_rad, observatory_itrf_m)


def _topo_to_lsrk(freq_hz, time_mjd_s, ra_rad, dec_rad, observatory_itrf_m) -> np.ndarray:
    location = EarthLocation.from_geocentric(*np.asarray(observatory_itrf_m, float), unit=u.m)
    observer = location.get_itrs(obstime=Time(time_mjd_s / 86400.0, format="mjd", scale="utc"))
    target = SkyCoord(ra_rad * u.rad, dec_rad * u.rad, frame="icrs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # astropy notes the target has no distance: at infinity
        sc = SpectralCoord(np.asarray(freq_hz, float) * u.Hz, observer=observer, target=target)
        return sc.with_observer_stationary_relative_to("lsrk").to_value(u.Hz)


def lsrk_factor(frame: str, time_mjd_s: float, ra_rad: float, dec_rad: float, observatory_itrf_m) -> float:
    """f_LSRK / f_frame for data in the given frame (1 for data already in LSRK;
    other frames than TOPO and LSRK are left as they are)."""
    if frame.upper() != "TOPO":
        return 1.0
    f0 = 100e9
    return float(topo_to_lsrk(np.array([f0]), time_mjd_s, ra_rad, dec_rad, observatory_itrf_m)[0] / f0)


def lsrk_factors(frame: str, times_mjd_s: np.ndarray, ra_rad: float, dec_rad: float, observatory_itrf_m,
                 step_s: float = 1800.0) -> np.ndarray:
    """f_LSRK / f_frame at each of the given times. The factor follows the Earth's
    rotation (a sinusoid of a sidereal day) and orbit: it is computed at least every
    step_s over the times' span (each conversion costs astropy a quarter of a second)
    and interpolated with a cubic spline, good to ~1e-4 m/s at a 30-minute step."""
    times = np.asarray(times_mjd_s, float)
    if frame.upper() != "TOPO" or not len(times):
        return np.ones(len(times))
    lo, hi = float(times.min()), float(times.max())
    if hi - lo < 1.0:
        return np.full(len(times), lsrk_factor(frame, lo, ra_rad, dec_rad, observatory_itrf_m))
    grid = np.linspace(lo, hi, max(4, int(np.ceil((hi - lo) / step_s)) + 1))
    k = np.array([lsrk_factor(frame, t, ra_rad, dec_rad, observatory_itrf_m) for t in grid])
    return CubicSpline(grid, k - 1.0)(times) + 1.0


# the fastest the line-of-sight velocity of an observer on the Earth changes relative to
# the LSRK: the equator's rotation (465 m/s x 2 pi / sidereal day) plus the orbit's turning
# (30 km/s x 2 pi / year), in m/s per second
MAX_DRIFT_M_S2 = 465.1 * 2 * np.pi / 86164.1 + 29.8e3 * 2 * np.pi / 3.156e7


def max_drift_channels(freq_hz: np.ndarray, span_s: float) -> float:
    """An upper bound on how far (in channels) the TOPO-to-LSRK shift can move a
    spectrum over span_s seconds: below a small fraction, nothing needs moving."""
    if len(freq_hz) < 2:
        return 0.0
    return MAX_DRIFT_M_S2 * span_s / 299792458.0 * float(np.max(freq_hz)) / abs(float(freq_hz[1] - freq_hz[0]))


def channel_shifts(freq_hz: np.ndarray, factors: np.ndarray, factor_ref: float) -> np.ndarray:
    """Per row, where (in channels, fractional) the output channel j of a cube
    labelled f_j x factor_ref lies in that row's own spectrum: j + shift. The row saw
    LSRK frequency F at f = F / factor, so F_j = f_j factor_ref is at
    f_j factor_ref / factor; one shift for the whole spw (its channels differ from the
    centre's by the fractional bandwidth, a few percent of a small shift)."""
    if len(freq_hz) < 2:
        return np.zeros(len(factors))
    df = float(freq_hz[1] - freq_hz[0])
    return float(np.mean(freq_hz)) * (factor_ref / np.asarray(factors) - 1.0) / df
