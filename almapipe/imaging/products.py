"""Primary beam and FITS export.

FITS images carry RA---SIN/DEC--SIN celestial axes, a FREQ axis in the
frame of the data (SPECSYS), a STOKES axis, BUNIT, and BMAJ/BMIN/BPA, so
astropy, CARTA, DS9 and CASA's importfits read them; and the keys CASA's
exportfits writes from the MS (DATE-OBS, MJD-OBS, TIMESYS, OBSGEO-X/Y/Z,
OBSRA/OBSDEC, INSTRUME, OBSERVER, RESTFRQ, RADESYS of the data's frame, BTYPE,
HISTORY).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

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
    d = (np.arange(npix) - npix // 2) * cell_rad
    fwhm = pb_fwhm(freq_hz, dish_m, telescope)
    # a Gaussian is the product of its x and y profiles: two rows, not npix^2 coordinates
    return pb_response((d - offset_lm[1]) ** 2, fwhm)[:, None] * pb_response((-d - offset_lm[0]) ** 2, fwhm)[None, :]


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


# FITS RADESYS/EQUINOX of the MS's direction frames, as CASA's exportfits writes them
RADESYS = {"ICRS": ("ICRS", 2000.0), "J2000": ("FK5", 2000.0), "B1950": ("FK4", 1950.0),
           "B1950_VLA": ("FK4", 1979.9)}


def pipeline_version() -> str:
    """almapipe's version from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("almapipe")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ObsInfo:
    """What an image's header says about the observation it comes from (exportfits
    writes these from the MS): its start, observer, where the array is and the frame
    of its directions."""
    date_obs: str = ""                   # ISO UTC, the observation's start
    observer: str = ""
    obsgeo_m: tuple | None = None        # the array centre, ITRF x, y, z in metres
    direction_frame: str = "J2000"       # FIELD.PHASE_DIR's MEASINFO reference
    history: tuple = ()                  # HISTORY lines (pipeline version, recipe, stage)


def obs_info(observation: dict, history: tuple = ()) -> ObsInfo:
    """ObsInfo from the observation summary (msio.listobs.summary): OBSGEO is the mean
    position of the antennas with data."""
    pos = [a["position"] for a in observation.get("antennas", []) if a.get("has_data", True)]
    return ObsInfo(date_obs=observation.get("start", ""), observer=observation.get("observer", ""),
                   obsgeo_m=tuple(float(x) for x in np.mean(pos, axis=0)) if pos else None,
                   direction_frame=observation.get("direction_frame", "J2000"), history=tuple(history))


def image_header(ra_rad: float, dec_rad: float, npix: int, cell_rad: float, freqs: np.ndarray,
                 frame: str, bunit: str, beam: tuple | None, field: str, telescope: str,
                 restfreq: float | None = None, *, bandwidth_hz: float | None = None,
                 obs: ObsInfo | None = None, obs_radec: tuple | None = None) -> fits.Header:
    """The header of an image as CASA's exportfits writes it. freqs: the planes'
    frequencies (a cube's channels, in their order: CDELT3 < 0 where they descend) or,
    for an mfs image, its one centre frequency with bandwidth_hz the width of the
    selected band (CDELT3). A one-plane cube gives its channel width as bandwidth_hz.
    restfreq: the line's rest frequency (RESTFRQ; needed for a velocity axis).
    obs: the observation's facts (DATE-OBS, MJD-OBS, OBSGEO-X/Y/Z, OBSERVER, RADESYS,
    HISTORY); obs_radec: the field's direction in radians (OBSRA/OBSDEC; default the
    image centre)."""
    obs = obs or ObsInfo()
    from astropy.io import fits          # here: astropy.io.fits takes 0.2 s to import
    from astropy.time import Time
    h = fits.Header()
    if bunit.startswith("Jy"):           # an image of the sky (not its pb or mask)
        h["BTYPE"] = "Intensity"
    h["OBJECT"] = field
    h["BUNIT"] = bunit
    h["CTYPE1"], h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CUNIT1"] = \
        "RA---SIN", float(np.degrees(ra_rad)), -float(np.degrees(cell_rad)), npix // 2 + 1.0, "deg"
    h["CTYPE2"], h["CRVAL2"], h["CDELT2"], h["CRPIX2"], h["CUNIT2"] = \
        "DEC--SIN", float(np.degrees(dec_rad)), float(np.degrees(cell_rad)), npix // 2 + 1.0, "deg"
    freqs = np.atleast_1d(np.asarray(freqs, float))
    width = float(freqs[1] - freqs[0]) if len(freqs) > 1 else float(bandwidth_hz or 0.0)
    if not width:
        raise ValueError("image_header: one plane needs its bandwidth (bandwidth_hz)")
    h["CTYPE3"], h["CRVAL3"], h["CDELT3"], h["CRPIX3"], h["CUNIT3"] = "FREQ", float(freqs[0]), width, 1.0, "Hz"
    h["CTYPE4"], h["CRVAL4"], h["CDELT4"], h["CRPIX4"], h["CUNIT4"] = "STOKES", 1.0, 1.0, 1.0, ""
    if restfreq:
        h["RESTFRQ"] = (float(restfreq), "Rest Frequency (Hz)")
    h["SPECSYS"] = (frame, "Spectral reference frame")
    radesys, equinox = RADESYS.get(obs.direction_frame.upper(), ("FK5", 2000.0))
    h["RADESYS"], h["EQUINOX"] = radesys, equinox
    if beam is not None:
        h["BMAJ"], h["BMIN"], h["BPA"] = beam[0] / 3600.0, beam[1] / 3600.0, float(beam[2])
    h["TELESCOP"], h["INSTRUME"] = telescope, telescope
    h["OBSERVER"] = obs.observer
    if obs.date_obs:
        t = Time(obs.date_obs, scale="utc")
        h["DATE-OBS"] = (t.isot, "Observation start (UTC)")
        h["MJD-OBS"] = (float(t.mjd), "Observation start (MJD, UTC)")
        h["TIMESYS"] = "UTC"
    ora, odec = obs_radec if obs_radec is not None else (ra_rad, dec_rad)
    h["OBSRA"], h["OBSDEC"] = float(np.degrees(ora) % 360.0), float(np.degrees(odec))
    if obs.obsgeo_m is not None:
        h["OBSGEO-X"], h["OBSGEO-Y"], h["OBSGEO-Z"] = (float(x) for x in obs.obsgeo_m)
    h["DATE"] = (Time.now().isot, "Date FITS file was written")
    h["ORIGIN"] = f"almapipe {pipeline_version()}"
    for line in obs.history:
        h.add_history(line)
    return h


# planes converted to big-endian and written this many bytes at a time
FITS_WRITE_BYTES = 32 << 20


def fits_header_bytes(shape: tuple, header: fits.Header) -> bytes:
    """The primary header of a (STOKES, FREQ, DEC, RA) float32 image of shape (nchan,
    ny, nx), as astropy's writeto writes it (BITPIX, NAXISn in order; END, padded)."""
    from astropy.io import fits
    n, ny, nx = shape
    # the header astropy makes for such data, from a view of no size
    hdr = fits.PrimaryHDU(data=np.broadcast_to(np.float32(0), (1, n, ny, nx)), header=header).header
    return hdr.tostring(endcard=True, padding=True).encode("ascii")


def fits_padding(data_bytes: int) -> bytes:
    """The zeros that fill a FITS data unit of data_bytes to its 2880-byte record."""
    return b"\0" * (-data_bytes % 2880)


def plane_chunks(planes) -> "Iterator[memoryview]":
    """The FITS data of (nchan, ny, nx) planes (an array, a memmap, a list of planes):
    big-endian float32, a few planes at a time, each converted once."""
    n = len(planes)
    if not n:
        return
    ny, nx = np.shape(planes[0])
    step = max(1, FITS_WRITE_BYTES // max(ny * nx * 4, 1))
    for k in range(0, n, step):
        yield np.ascontiguousarray(planes[k:k + step], ">f4").data


def write_fits(path: str, planes: np.ndarray, header: fits.Header) -> str:
    """planes is (nchan, ny, nx); written as (STOKES, FREQ, DEC, RA), the bytes astropy's
    writeto writes. The data go a few planes at a time, each converted to big-endian
    once: writeto swaps the whole array in place and back (two passes over a cube, and
    over its file where it is a memmap), where this makes one. Returns the file's
    SHA-256, taken as it is written (the upload then need not read it again for it)."""
    import hashlib
    shape = np.shape(planes)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def put(chunk) -> None:
            digest.update(chunk)
            f.write(chunk)
        put(fits_header_bytes(shape, header))
        for chunk in plane_chunks(planes):
            put(chunk)
        put(fits_padding(int(np.prod(shape)) * 4))
    return digest.hexdigest()
