"""Primary beam and FITS export.

FITS images carry RA---SIN/DEC--SIN celestial axes, a FREQ axis in the
frame of the data (SPECSYS), a STOKES axis, BUNIT, and BMAJ/BMIN/BPA, so
astropy, CARTA, DS9 and CASA's importfits read them.
"""
from __future__ import annotations

import numpy as np
from astropy.io import fits

# FWHM of the primary beam in units of lambda/D, per telescope: ALMA's
# heuristics use 1.13; the VLA's measured beam is 42'/nu_GHz for 25 m, 1.02.
PB_FWHM_FACTOR = {"ALMA": 1.13, "VLA": 1.02, "EVLA": 1.02}


def pb_fwhm(freq_hz, dish_m: float, telescope: str):
    """The primary beam's FWHM in radians (freq_hz a number or an array)."""
    return PB_FWHM_FACTOR.get(telescope.upper(), 1.13) * 299792458.0 / freq_hz / dish_m


def pb_response(r2_rad2, fwhm_rad):
    """The Gaussian primary beam (peak 1) at squared distances r2 from its centre."""
    return np.exp(-4 * np.log(2) * r2_rad2 / fwhm_rad ** 2)


def primary_beam(npix: int, cell_rad: float, freq_hz: float, dish_m: float, telescope: str,
                 offset_lm: tuple = (0.0, 0.0)) -> np.ndarray:
    """Gaussian primary-beam response (peak 1) on the image grid, centred on the
    image or, for a mosaic's pointing, at offset_lm = (l east, m north) in radians
    from the image centre (x runs west: l = -(x - npix//2) cell)."""
    yy, xx = (np.mgrid[:npix, :npix] - npix // 2) * cell_rad
    return pb_response((-xx - offset_lm[0]) ** 2 + (yy - offset_lm[1]) ** 2, pb_fwhm(freq_hz, dish_m, telescope))


def joint_coverage(beams: list, fractions) -> np.ndarray:
    """A = sum_p f_p PB_p^2 of a joint mosaic's pointings' beams, the fractions taken
    to sum to 1: what the mosaic's images are normalised by (measurement.JointMosaic)
    and its primary beam and noise follow from."""
    total = float(np.sum(fractions)) or 1.0
    return sum(f / total * b ** 2 for b, f in zip(beams, fractions))


def mosaic_coverage(npix: int, cell_rad: float, freq_hz: float, dish_m: float, telescope: str,
                    offsets_lm: list, fractions) -> np.ndarray:
    """joint_coverage of pointings at offsets_lm on the image grid."""
    return joint_coverage([primary_beam(npix, cell_rad, freq_hz, dish_m, telescope, o) for o in offsets_lm],
                          fractions)


def mosaic_noise_factor(npix: int, cell_rad: float, freq_hz: float, dish_m: float, telescope: str,
                        offsets_lm: list, fractions) -> float:
    """How much noisier a joint mosaic is than all its data at one pointing: its flat
    noise is that over sqrt(max A) (measurement.JointMosaic)."""
    a = mosaic_coverage(npix, cell_rad, freq_hz, dish_m, telescope, offsets_lm, fractions)
    return float(1.0 / np.sqrt(a.max()))


def mosaic_beam(npix: int, cell_rad: float, freq_hz: float, dish_m: float, telescope: str,
                offsets_lm: list, fractions) -> np.ndarray:
    """The primary beam of a joint mosaic, sqrt(A / max A) with A = sum_p f_p PB_p^2
    (measurement.JointMosaic): the sensitivity pattern its images carry."""
    a = mosaic_coverage(npix, cell_rad, freq_hz, dish_m, telescope, offsets_lm, fractions)
    return np.sqrt(a / a.max())


def image_header(ra_rad: float, dec_rad: float, npix: int, cell_rad: float, freqs: np.ndarray,
                 frame: str, bunit: str, beam: tuple | None, field: str, telescope: str,
                 restfreq: float | None = None) -> fits.Header:
    h = fits.Header()
    h["BUNIT"] = bunit
    h["CTYPE1"], h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CUNIT1"] = \
        "RA---SIN", float(np.degrees(ra_rad)), -float(np.degrees(cell_rad)), npix // 2 + 1.0, "deg"
    h["CTYPE2"], h["CRVAL2"], h["CDELT2"], h["CRPIX2"], h["CUNIT2"] = \
        "DEC--SIN", float(np.degrees(dec_rad)), float(np.degrees(cell_rad)), npix // 2 + 1.0, "deg"
    width = float(freqs[1] - freqs[0]) if len(freqs) > 1 else 0.0
    h["CTYPE3"], h["CRVAL3"], h["CDELT3"], h["CRPIX3"], h["CUNIT3"] = \
        "FREQ", float(freqs[0]), width if width else 1.0, 1.0, "Hz"
    h["CTYPE4"], h["CRVAL4"], h["CDELT4"], h["CRPIX4"], h["CUNIT4"] = "STOKES", 1.0, 1.0, 1.0, ""
    h["RADESYS"], h["EQUINOX"] = "FK5", 2000.0
    h["SPECSYS"] = frame
    if restfreq:
        h["RESTFRQ"] = float(restfreq)
    if beam is not None:
        h["BMAJ"], h["BMIN"], h["BPA"] = beam[0] / 3600.0, beam[1] / 3600.0, float(beam[2])
    h["OBJECT"], h["TELESCOP"], h["ORIGIN"] = field, telescope, "almapipe"
    return h


def write_fits(path: str, planes: np.ndarray, header: fits.Header) -> None:
    """planes is (nchan, ny, nx); written as (STOKES, FREQ, DEC, RA)."""
    data = np.asarray(planes, np.float32)[None]
    fits.PrimaryHDU(data=data, header=header).writeto(path, overwrite=True)
