"""Spectral reference frames: the ALMA correlator records TOPO frequencies; the
pipeline's cubes and cont.dat are in LSRK, as the ALMA pipeline writes them.

Within one execution block the TOPO-to-LSRK shift changes by well under a
channel (Earth rotation: < 0.5 m/s per minute), so one conversion at the mean
time of a field's data relabels its channels (checked against CASA's measures
to 1e-9). Channels are not regridded between blocks observed on different days.
"""
from __future__ import annotations

import warnings

import numpy as np
from astropy import units as u
from astropy.coordinates import EarthLocation, SkyCoord, SpectralCoord
from astropy.time import Time


def topo_to_lsrk(freq_hz: np.ndarray, time_mjd_s: float, ra_rad: float, dec_rad: float,
                 observatory_itrf_m) -> np.ndarray:
    """TOPO frequencies seen from the observatory at a time, towards (ra, dec) ICRS,
    as LSRK frequencies."""
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
