"""An ALMA-like execution block with known truth, written as a MeasurementSet.

What is in it (each corruption recorded in the truth files next to the MS):

* intents in the STATE table and an ALMA scan sequence: Tsys (ATMOSPHERE) and
  bandpass/flux calibrator first, then the phase calibrator around target
  scans, a check source, Tsys scans on the phase calibrator;
* spectral windows as importasdm writes them: the WVR spw (id 0: 4 channels
  near 183 GHz, one correlation, auto-correlations of every integration whose
  brightness temperatures follow the path fluctuations that corrupt the phases),
  per baseband a Tsys (TDM, 128 channels) spw and its channel average, then per
  baseband a science spw and its channel average (``CH_AVG``), with ALMA's spw
  names; spws below the LO are lower sideband, their channels descending in
  frequency (negative CHAN_WIDTH);
* a SYSCAL table with Tsys spectra per antenna, Tsys spw and ATMOSPHERE scan,
  rising towards an atmospheric line near the top of the last science spw; the
  ATMOSPHERE scans hold data in the Tsys spws only; thermal noise follows the
  radiometer equation;
* antenna position errors for a few antennas, with the corrections in
  antennapos.csv;
* online flags in the FLAG_CMD table (an antenna off source for a while; its
  data in that time are noise);
* spws of different widths (preset 'mixed': a narrow spw beside wide ones)
  with instrumental phase offsets between spws, for spw phase-up;
* per-antenna bandpasses (ripple, phase slope, TDM edge roll-off), slowly
  drifting amplitude gains, a dead antenna, shadowing at low elevation and a
  few bad channels;
* a sky of point sources with known flux and spectral index, and a target
  with continuum and a spectral line.

Conventions are the ones CASA uses and the pipeline checks against CASA:
UVW is the projection of x(ant1) - x(ant2); V_12 = g_1 conj(g_2) V_sky and
V_sky = sum S exp(+2 pi i (u l + v m + w (n - 1)) nu / c). Raw data are
correlation coefficients: V_raw = V_Jy / (JyperK sqrt(Tsys_1 Tsys_2)).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass

import casacore.tables as ct
import numpy as np
from astropy import units as u
from astropy.coordinates import EarthLocation
from astropy.time import Time

from .alma_pads import ALMA_C1_PADS, ALMA_C8_PADS, ALMA_C9_PADS, ALMA_SITE
from ..imaging.mosaic import direction_of, hexagonal_offsets, sin_offset
from ..imaging.products import pb_fwhm, pb_response
from ..msio.ms import CORR_CODES, FREQ_FRAMES, fill_table, new_ms, set_direction_frame
from ..heuristics.flagging import shadow_mask

C = 299792458.0
# the array configurations the simulator places its antennas on (SimConfig.configuration)
CONFIGURATIONS = {"C1": ALMA_C1_PADS, "C8": ALMA_C8_PADS, "C9": ALMA_C9_PADS}
WVR_OFFSETS_GHZ = (0.88, 2.2, 4.3, 7.4)          # the four WVR channels around 183.31 GHz
WVR_DTDL = (2.9, 1.7, 0.9, 0.45)                  # K of brightness per mm of path, per channel


@dataclass
class SimConfig:
    """What to simulate. Presets: 'small' (tests) and 'realistic' (benchmarks)."""
    nant: int = 8
    configuration: str = "C1"         # the pads the antennas stand on (CONFIGURATIONS)
    nspw: int = 2
    nchan: int = 32
    spw_width_hz: float = 1.875e9
    band_centre_hz: float = 230.0e9
    integration_s: float = 6.0
    target_scans: int = 3
    target_scan_s: float = 120.0
    phase_scan_s: float = 30.0
    bandpass_scan_s: float = 120.0
    check_scan_s: float = 60.0
    atm_scan_s: float = 12.0
    seed: int = 1
    # corruptions
    gain_amp_rms: float = 0.1
    gain_drift_per_hour: float = 0.015   # rms fractional amplitude drift (ALMA: 1-2 % per hour)
    path_rms_mm: float = 0.15         # atmospheric path fluctuation (phase rms ~ 40 deg at 230 GHz)
    # path the radiometers do not see (dry air, liquid water): what WVR correction leaves;
    # the injected improvement factor is sqrt(path^2 + untracked^2) / untracked
    path_untracked_mm: float = 0.025
    spw_phase_offset_deg: float = 60.0   # rms instrumental phase offset between spws
    online_flags: int = 1             # FLAG_CMD entries: an antenna off source for online_flag_s
    online_flag_s: float = 60.0
    spw_widths_hz: tuple | None = None   # per spw; None: spw_width_hz for all
    pos_error_mm: float = 2.0         # size of the antenna position errors
    n_pos_errors: int = 2
    dead_antenna: bool = True
    bad_channels: int = 2
    # off unless given (preset 'outliers'), for gainflag and flagtargets: one antenna's
    # gain scaled in one spw (antenna index, spw index, factor), and a burst of bad data
    # on one target baseline (antenna index, antenna index, seconds from the start of
    # the first target scan), 30 sigma in every channel of every spw
    bad_gain: tuple | None = None
    target_burst: tuple | None = None
    # the correlator's Hanning window on the science spws, ALMA's default: each channel's
    # noise is white noise weighted 1/4, 1/2, 1/4 over three channels, so neighbours share
    # 2/3 of it, and EFFECTIVE_BW is 8/3 of a channel's width (the sky is not smoothed)
    hanning: bool = True
    tsys_k: float = 90.0
    tsys_nchan: int = 128             # TDM Tsys spws: 128 channels over the 2 GHz baseband
    tsys_width_hz: float = 2.0e9
    jy_per_k: float = 40.0
    # elevation of the bandpass calibrator at the start; None: just below the elevation at
    # which the close pair stops shadowing, so the first minutes are shadowed
    start_elevation_deg: float | None = None
    date: str = "2026-05-01"          # the day observed (EBs of an MOUS: different days)
    # the flux calibrator's flux that flux.csv gives, as a fraction off the truth (a
    # catalogue error: that EB's whole flux scale is off by it)
    catalogue_flux_error: float = 0.0
    # sky
    bp_flux_jy: float = 3.0
    bp_spix: float = -0.6
    phase_flux_jy: float = 0.8
    phase_spix: float = -0.4
    check_flux_jy: float = 0.3
    target_cont_jy: float = 0.05
    target_line_jy: float = 0.2
    target_offset_arcsec: tuple = (0.6, -0.4)
    # the spectral index of the target's central continuum source (S ~ nu^spix, S =
    # target_cont_jy at the band centre), and more continuum sources of the target with
    # their own: ((flux Jy at the band centre, arcsec east, arcsec north, spix), ...)
    target_spix: float = 0.0
    target_spix_sources: tuple = ()
    # science spw centres (Hz), to spread them over a wide band (preset 'wideband');
    # None: side by side around band_centre_hz
    spw_centres_hz: tuple | None = None
    # a mosaic target: this many pointings on a hexagonal grid (spacing in primary-beam
    # FWHMs, ALMA's Nyquist 0.511), each target scan visiting every pointing in turn, and
    # one more continuum source (flux, arcsec east, arcsec north of the centre) between them
    mosaic_pointings: int = 1
    mosaic_spacing_fwhm: float = 0.511
    mosaic_source: tuple = (0.1, 14.0, 9.0)
    # a solar system body as the flux calibrator (preset 'sso'): its own field and scan
    # (after the bandpass scan; J1924-2914 is then the bandpass calibrator only), a
    # disk of the Butler-model brightness at its distance, with an ephemeris table
    sso_body: str | None = None
    sso_scan_s: float = 120.0

    @staticmethod
    def preset(name: str, **overrides) -> "SimConfig":
        presets = {
            "small": {},
            "realistic": {"nant": 43, "nspw": 4, "nchan": 128, "target_scans": 8, "target_scan_s": 360.0,
                          "phase_scan_s": 30.0, "bandpass_scan_s": 300.0, "check_scan_s": 120.0},
            # the target a 7-pointing mosaic (a hexagon around the centre)
            "mosaic": {"mosaic_pointings": 7},
            # a narrow (FDM-like) spw beside two wide ones: too little SNR per integration
            # for its own phases on the phase calibrator, so spwphaseup maps it to a wide one
            "mixed": {"nspw": 3, "spw_widths_hz": (1.875e9, 1.875e9, 0.1171875e9)},
            # Ganymede as the flux calibrator: a 1.3 arcsec disk at 5.5 AU, its visibility
            # 0.4-0.5 of its flux on the longest baselines at 230 GHz (partially resolved)
            "sso": {"sso_body": "Ganymede"},
            # Uranus: a 3.4 arcsec disk, resolved out (visibility < 10 % of its flux) beyond
            # ~80 m at 230 GHz, about half the small array's baselines
            "sso-uranus": {"sso_body": "Uranus"},
            # an antenna at 0.4 of its gain in the second spw, and a burst on a target baseline
            "outliers": {"bad_gain": (3, 1, 0.4), "target_burst": (1, 4, 30.0)},
            # a wide band (ALMA Band 3, spws at 90.5, 92.5, 102.5 and 104.5 GHz: 16 % of
            # the centre frequency) and continuum sources of known spectral index (a
            # synchrotron-like one at the centre, a dust-like one beside it): the
            # aggregate continuum is imaged with nterms = 2 and its alpha checked
            # 16 antennas: with 8 the PSF's sidelobes leave such bright sources half cleaned
            "wideband": {"nant": 16, "nspw": 4, "band_centre_hz": 97.5e9,
                         "spw_centres_hz": (90.5e9, 92.5e9, 102.5e9, 104.5e9),
                         "target_cont_jy": 0.5, "target_spix": -0.8,
                         "target_spix_sources": ((0.25, 12.0, 8.0, 2.0),)},
            # a long-baseline EB: antennas on ALMA's C-8 pads (baselines to 8.5 km) and FDM
            # science spws of 3840 channels (488 kHz); 16 antennas (baselines 0.1-8.5 km, median
            # 3.3 km) and short scans, so that its science data stay ~1 GB. Tests take it
            # smaller still (nant, nchan, scans as overrides).
            # Started at 45 degrees: no close pair of pads shadows here.
            "longbaseline": {"configuration": "C8", "nant": 16, "nchan": 3840, "start_elevation_deg": 45.0,
                             "target_scans": 2, "target_scan_s": 60.0, "bandpass_scan_s": 60.0,
                             "check_scan_s": 30.0, "phase_scan_s": 20.0},
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
        return SimConfig(**{**presets[name], **overrides})


FIELDS = [  # name, ra (deg), dec (deg), role
    ("J1924-2914", 291.212733, -29.241700, "BANDPASS"),
    ("J1832-2039", 278.166667, -20.654167, "PHASE"),
    ("J1820-2528", 275.0, -25.47, "CHECK"),
    ("Target", 277.5, -21.9, "TARGET"),
]
OBS_MODES = {
    "ATMOSPHERE": "CALIBRATE_ATMOSPHERE#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE",
    "BANDPASS": "CALIBRATE_BANDPASS#ON_SOURCE,CALIBRATE_FLUX#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE",
    "PHASE": "CALIBRATE_PHASE#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE",
    "CHECK": "OBSERVE_CHECK_SOURCE#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE",
    "TARGET": "OBSERVE_TARGET#ON_SOURCE",
}
# a solar system flux calibrator: where the simulator puts it on the sky (its true
# position need not be up during the simulated EB; it stands still there, and its
# ephemeris table says so) and the planet whose distance it takes (a moon's distance
# differs from its planet's by < 0.2 %, which the ephemeris table makes the truth)
SSO_POSITION_DEG = (284.5, -23.5)
SSO_DISTANCE_OF = {"io": "jupiter", "europa": "jupiter", "ganymede": "jupiter", "callisto": "jupiter",
                   "titan": "saturn", "mars": "mars", "uranus": "uranus", "neptune": "neptune"}
SSO_MODES = {"BANDPASS": "CALIBRATE_BANDPASS#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE",
             "FLUX": "CALIBRATE_FLUX#ON_SOURCE,CALIBRATE_WVR#ON_SOURCE"}


def choose_pads(nant: int, azimuth_rad: float = 0.0, configuration: str = "C1") -> list:
    """nant pads of a configuration (CONFIGURATIONS) spread over it (farthest-point
    order), so a small array keeps long baselines and is not all shadowed at once,
    starting from the close pair (< 20 m) best aligned with azimuth_rad: it shadows
    at low elevation when the array looks that way. A configuration without a pair
    that close (the long-baseline ones) starts from its closest pair."""
    all_pads = CONFIGURATIONS[configuration]
    xy = np.array([[p[1], p[2]] for p in all_pads])
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    i, j = np.nonzero((d > 0) & (d < 20))
    if not len(i):
        i, j = np.nonzero(d == d[d > 0].min())
    ang = np.arctan2(xy[j, 0] - xy[i, 0], xy[j, 1] - xy[i, 1])    # east of north
    k = int(np.argmin(np.abs(np.sin(ang - azimuth_rad))))
    chosen = [int(i[k]), int(j[k])][:nant]
    order = list(chosen)
    dist = np.min([np.linalg.norm(xy - xy[k], axis=1) for k in chosen], axis=0)
    while len(chosen) < min(nant, len(xy)):
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(xy - xy[k], axis=1))
    # the close pair first: callers use pads[0:2]
    return [all_pads[k] for k in order + sorted(set(chosen) - set(order))]


def antenna_itrf(pads: list) -> np.ndarray:
    """ITRF xyz (nant, 3) of pads given in local east/north/up."""
    lon, lat, h = np.radians(ALMA_SITE[0]), np.radians(ALMA_SITE[1]), ALMA_SITE[2]
    ref = EarthLocation.from_geodetic(ALMA_SITE[0] * u.deg, ALMA_SITE[1] * u.deg, h * u.m)
    ref_xyz = np.array([ref.x.value, ref.y.value, ref.z.value])
    enu = np.array([[p[1], p[2], p[3]] for p in pads])
    # local east/north/up to Earth-centred axes
    rot = np.array([[-np.sin(lon), -np.sin(lat) * np.cos(lon), np.cos(lat) * np.cos(lon)],
                    [np.cos(lon), -np.sin(lat) * np.sin(lon), np.cos(lat) * np.sin(lon)],
                    [0.0, np.cos(lat), np.sin(lat)]])
    return ref_xyz + enu @ rot.T


def antenna_uvw(xyz: np.ndarray, gast: np.ndarray, ra: float, dec: float) -> np.ndarray:
    """Per-antenna (u, v, w) in metres, (ntime, nant, 3); baseline uvw = uvw_1 - uvw_2."""
    H = gast[:, None] - ra
    X, Y, Z = xyz[:, 0][None], xyz[:, 1][None], xyz[:, 2][None]
    uu = np.sin(H) * X + np.cos(H) * Y
    vv = -np.sin(dec) * np.cos(H) * X + np.sin(dec) * np.sin(H) * Y + np.cos(dec) * Z
    ww = np.cos(dec) * np.cos(H) * X - np.cos(dec) * np.sin(H) * Y + np.sin(dec) * Z
    return np.stack([uu, vv, ww], axis=-1)


def elevation(gast: np.ndarray, ra: float, dec: float) -> np.ndarray:
    lat = np.radians(ALMA_SITE[1])
    H = gast + np.radians(ALMA_SITE[0]) - ra
    return np.arcsin(np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(H))


class Simulator:
    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.wvr_rng = np.random.default_rng(cfg.seed + 104729)
        c = cfg
        # start when the bandpass calibrator rises through start_elevation_deg
        lat = np.radians(ALMA_SITE[1])
        ra0, dec0 = np.radians(FIELDS[0][1]), np.radians(FIELDS[0][2])
        self.fields = self._fields()

        def hour_angle(el_deg):
            cos_h = (np.sin(np.radians(el_deg)) - np.sin(lat) * np.sin(dec0)) / (np.cos(lat) * np.cos(dec0))
            return -np.arccos(np.clip(cos_h, -1, 1))     # rising

        def azimuth(h):
            return np.arctan2(-np.cos(dec0) * np.sin(h),
                              np.sin(dec0) * np.cos(lat) - np.cos(dec0) * np.cos(h) * np.sin(lat))
        el_start = c.start_elevation_deg if c.start_elevation_deg is not None else 45.0
        if c.configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {c.configuration!r}; configurations: {', '.join(CONFIGURATIONS)}")
        pads = choose_pads(c.nant, azimuth(hour_angle(el_start)), c.configuration)
        if c.start_elevation_deg is None:
            # the close pair (pads[0:2] in choice order) shadows while d sin(el) < D, if aligned
            a, b = np.array(pads[0][1:3]), np.array(pads[1][1:3])
            el_start = np.degrees(np.arcsin(min(12.0 / np.linalg.norm(a - b), 1.0))) - 0.4
            pads = choose_pads(c.nant, azimuth(hour_angle(el_start)), c.configuration)
        h0 = hour_angle(el_start)
        t_ref = Time(f"{c.date}T00:00:00", scale="utc")
        lst_ref = t_ref.sidereal_time("apparent", longitude=ALMA_SITE[0] * u.deg).rad
        self.t0 = t_ref.mjd * 86400 + ((ra0 + h0 - lst_ref) % (2 * np.pi)) / (2 * np.pi) * 86164.0905
        self.start_elevation_deg = float(el_start)
        self.pads = [p[0] for p in pads]
        self.xyz = antenna_itrf(pads)
        n = c.nant
        # spectral set-up: science spws side by side around the band centre
        self.spw_widths = np.array(c.spw_widths_hz or [c.spw_width_hz] * c.nspw, float)
        if len(self.spw_widths) != c.nspw:
            raise ValueError(f"spw_widths_hz has {len(self.spw_widths)} entries for {c.nspw} spws")
        offs = (np.arange(c.nspw) - (c.nspw - 1) / 2) * (self.spw_widths.max() * 1.07)
        self.spw_centres = c.band_centre_hz + offs if c.spw_centres_hz is None else \
            np.array(c.spw_centres_hz, float)
        if len(self.spw_centres) != c.nspw:
            raise ValueError(f"spw_centres_hz has {len(self.spw_centres)} entries for {c.nspw} spws")
        self.chan_widths = self.spw_widths / c.nchan          # magnitudes (LSB widths are negative)
        # spws below the first LO (the band centre) are lower sideband: their channels run
        # down in frequency (CHAN_WIDTH < 0), as about half of ALMA's spws do
        self.lsb = [bool(fc < c.band_centre_hz - 1.0) for fc in self.spw_centres]
        self.freqs = [self._channels(fc, w, c.nchan, lsb)
                      for fc, w, lsb in zip(self.spw_centres, self.spw_widths, self.lsb)]
        # Tsys (TDM) spws covering each science spw's baseband, in the same sideband
        self.tsys_freqs = [self._channels(fc, c.tsys_width_hz, c.tsys_nchan, lsb)
                           for fc, lsb in zip(self.spw_centres, self.lsb)]
        # spectral window ids as importasdm numbers them: the WVR spw first, then per
        # baseband the Tsys spw and its channel average, then per baseband the science spw
        # and its channel average. Science spws are not 0..n-1 in real EBs either.
        self.wvr_spw = 0
        self.tsys_spw_ids = [1 + 2 * s for s in range(c.nspw)]
        self.science_spw_ids = [1 + 2 * c.nspw + 2 * s for s in range(c.nspw)]
        # truth: bandpasses (ripple, phase slope, TDM edge roll-off)
        ch = np.arange(c.nchan)
        edge = np.clip(np.minimum(ch + 1, c.nchan - ch) / max(c.nchan * 0.06, 1), 0, 1) ** 0.5
        self.bandpass = np.empty((c.nspw, n, c.nchan, 2), complex)
        for s in range(c.nspw):
            amp = 1 + 0.05 * np.sin(2 * np.pi * ch[None, :, None] / c.nchan * self.rng.uniform(1, 3, (n, 1, 2))
                                    + self.rng.uniform(0, 6, (n, 1, 2)))
            phase = np.radians(20) * self.rng.normal(size=(n, 1, 2)) * (ch[None, :, None] / c.nchan - 0.5)
            self.bandpass[s] = amp * edge[None, :, None] * np.exp(1j * phase)
        self.gain_amp0 = 1 + c.gain_amp_rms * self.rng.normal(size=(n, 2))
        hours = (sum(p[2] for p in self.scan_plan()) + 10.0 * len(self.scan_plan())) / 3600
        self.gain_drift = c.gain_drift_per_hour * hours * self.rng.normal(size=(n, 2))   # over the EB
        self.gain_phase0 = self.rng.uniform(-np.pi, np.pi, (n, 2))
        self.tsys_scale = self.rng.uniform(0.85, 1.2, n)
        self.pos_err = np.zeros((n, 3))
        err_ants = self.rng.choice(np.arange(1, n), size=min(c.n_pos_errors, n - 1), replace=False)
        for a in err_ants:
            self.pos_err[a] = self.rng.normal(size=3) * c.pos_error_mm / 1e3
        self.dead = int(n - 1) if c.dead_antenna else -1
        self.bad_channels = [(int(self.rng.integers(0, c.nspw)), int(ch_)) for ch_ in
                             self.rng.choice(np.arange(c.nchan // 5, 4 * c.nchan // 5), size=c.bad_channels, replace=False)]
        # a frozen turbulent screen blown over the array gives each antenna's path (mm)
        self.screen_k = self.rng.normal(size=(64, 2)) * 2 * np.pi / np.array([200.0, 200.0]) * 3
        self.screen_a = self.rng.normal(size=64) / np.sqrt(64)
        self.screen_p = self.rng.uniform(0, 2 * np.pi, 64)
        self.wind = np.array([8.0, 3.0])   # m/s
        enu = np.array([[p[1], p[2]] for p in pads])
        self.enu = enu - enu.mean(axis=0)
        extra = np.random.default_rng(c.seed + 7919)
        self.untracked_k = extra.normal(size=(64, 2)) * 2 * np.pi / 200.0 * 3
        self.untracked_a = extra.normal(size=64) / np.sqrt(64)
        self.untracked_p = extra.uniform(0, 2 * np.pi, 64)
        # instrumental phase per spw, antenna and correlation (spw 0 is the reference)
        self.spw_phase = np.radians(c.spw_phase_offset_deg) * extra.normal(size=(c.nspw, n, 2))
        self.spw_phase[0] = 0.0
        self.online = []        # (antenna, t_start, t_end) filled in write()

    @staticmethod
    def _channels(centre: float, width: float, nchan: int, lsb: bool) -> np.ndarray:
        """Channel centre frequencies, descending in a lower sideband."""
        f = centre - width / 2 + (np.arange(nchan) + 0.5) * width / nchan
        return f[::-1].copy() if lsb else f

    def science_index(self, spw_id: int) -> int:
        """The position (0..nspw-1) of a science spw given its id in the MS."""
        return self.science_spw_ids.index(int(spw_id))

    def _fields(self) -> list:
        """(name, ra deg, dec deg, role) per field: the calibrators, then the target's
        pointing(s); a mosaic's pointings share the target's name, as ALMA's do."""
        c = self.cfg
        name, ra, dec, role = FIELDS[3]
        sso = [(c.sso_body, *SSO_POSITION_DEG, "FLUX")] if c.sso_body else []
        if c.mosaic_pointings <= 1:
            return list(FIELDS) + sso
        fwhm = pb_fwhm(c.band_centre_hz, 12.0, "ALMA")
        out = list(FIELDS[:3])
        for l, m in hexagonal_offsets(c.mosaic_pointings, c.mosaic_spacing_fwhm * fwhm):
            ra_p, dec_p = direction_of(l, m, np.radians(ra), np.radians(dec))
            out.append((name, float(np.degrees(ra_p)), float(np.degrees(dec_p)), role))
        return out + sso

    def target_sources(self, freq: np.ndarray) -> list:
        """[(flux (nchan,), ra, dec)] of the target: a continuum source at its centre,
        a line source beside it, (mosaics) another continuum source between pointings,
        then target_spix_sources (target_source_spix gives every one's spectral index)."""
        c = self.cfg
        ra0, dec0 = np.radians(FIELDS[3][1]), np.radians(FIELDS[3][2])
        line_centre = self.spw_centres[0]
        line = c.target_line_jy * np.exp(-0.5 * ((freq - line_centre) / (0.06 * self.spw_widths[0])) ** 2)
        nu0 = c.band_centre_hz
        out = [(c.target_cont_jy * (freq / nu0) ** c.target_spix, 0.0, 0.0), (line, *c.target_offset_arcsec)]
        if c.mosaic_pointings > 1:
            out.append((np.full(len(freq), c.mosaic_source[0]), *c.mosaic_source[1:]))
        for flux, east, north, spix in c.target_spix_sources:
            out.append((flux * (freq / nu0) ** spix, east, north))
        arcsec = np.pi / 180 / 3600
        return [(flux, *direction_of(e * arcsec, n * arcsec, ra0, dec0)) for flux, e, n in out]

    def target_source_spix(self) -> list:
        """The spectral index of each of target_sources (None for the line source)."""
        c = self.cfg
        return [c.target_spix, None] + ([0.0] if c.mosaic_pointings > 1 else []) + \
            [float(s[3]) for s in c.target_spix_sources]

    def calibrate_target_ideally(self, ms: str, noise_jy: float, seed: int = 5) -> None:
        """Replace the target's science-spw DATA of an EB this simulator wrote by what a
        perfect calibration would leave: the sky (target_sources through the primary beam
        at each channel) plus thermal noise of noise_jy per visibility and correlation
        before the correlator's window (Hanning-smoothed along the channels as the EB's:
        a channel's is then sqrt(3/8) of it, and a continuum image's as it was unsmoothed),
        WEIGHT 1 / noise_jy^2, only the auto-correlations flagged. For imaging benchmarks and comparisons
        with other imagers on calibrated data, without running the calibration."""
        from ..msio import ms as msio
        rng = np.random.default_rng(seed)
        fids = [i for i, f in enumerate(self.fields) if f[3] == "TARGET"]
        for fid in fids:
            for sid in self.science_spw_ids:
                v = msio.read_vis(ms, sid, field_ids=[fid])
                model = np.zeros(v.data.shape[:2], complex)
                for flux, l, m in self.sky(fid, v.freq):
                    n1 = np.sqrt(1 - l * l - m * m) - 1
                    model += flux[None] * np.exp(2j * np.pi * (v.uvw[:, :1] * l + v.uvw[:, 1:2] * m
                                                               + v.uvw[:, 2:] * n1) * v.freq[None] / C)
                data = model[:, :, None] + noise_jy * self.channel_noise(v.data.shape, rng)
                data[v.ant1 == v.ant2] = 1.0
                msio.write_column(ms, v.rows, "DATA", data.astype(np.complex64))
                msio.write_column(ms, v.rows, "WEIGHT", np.full(v.weight.shape, noise_jy ** -2, np.float32))
                # auto-correlations flagged, as the pipeline's flagdata leaves them (CASA's Briggs
                # weighting counts unflagged ones in its density, and so weights more naturally)
                msio.write_flags(ms, v.rows, np.broadcast_to((v.ant1 == v.ant2)[:, None, None], v.data.shape))

    # ------------------------------------------------------------ truth models
    def path_mm(self, t_s: np.ndarray, untracked: bool = False) -> np.ndarray:
        """Excess atmospheric path (ntime, nant) in mm: the water-vapour path the
        radiometers see, or (untracked) the part they do not see."""
        k, a, p, rms = (self.untracked_k, self.untracked_a, self.untracked_p, self.cfg.path_untracked_mm) \
            if untracked else (self.screen_k, self.screen_a, self.screen_p, self.cfg.path_rms_mm)
        pos = self.enu[None, :, :] - self.wind[None, None, :] * t_s[:, None, None]
        arg = np.einsum("tak,mk->tam", pos, k) + p
        scr = (np.cos(arg) * a).sum(axis=2)
        return rms * scr / max(np.std(scr), 1e-9) if scr.size > 1 else scr

    def tsys(self, spw: int, t_frac: np.ndarray, el: np.ndarray) -> np.ndarray:
        """Tsys (ntime, nant, nchan) in K on the channels of science spw index spw."""
        return self.tsys_at(self.freqs[spw], t_frac, el)

    def tsys_at(self, freq: np.ndarray, t_frac: np.ndarray, el: np.ndarray) -> np.ndarray:
        """Tsys (ntime, nant, nfreq) in K at any frequencies: airmass, a slow drift, and a
        pressure-broadened atmospheric line near the top of the last science spw."""
        c = self.cfg
        top = self.freqs[-1]
        lo, span = float(top.min()), float(np.ptp(top)) or float(self.spw_widths[-1])
        line = 1.0 + 1.5 * np.exp(-((np.asarray(freq) - (lo + 0.92 * span)) / (0.12 * span)) ** 2)
        airmass = 1 / np.sin(np.clip(el, np.radians(10), None))
        base = c.tsys_k * (0.6 + 0.4 * airmass)[:, None, None] * self.tsys_scale[None, :, None]
        # and a slow drift (2 % over the EB: precipitable water vapour changing)
        return base * line[None, None, :] * (1 + 0.02 * t_frac)[:, None, None]

    def gains(self, t_frac: np.ndarray) -> np.ndarray:
        """Complex electronic gains (ntime, nant, 2), slowly drifting."""
        amp = self.gain_amp0[None] * (1 + self.gain_drift[None] * t_frac[:, None, None])
        ph = self.gain_phase0[None] + 0.3 * np.sin(2 * np.pi * t_frac[:, None, None] * 0.7)
        g = amp * np.exp(1j * ph)
        if self.dead >= 0:
            g[:, self.dead] *= 0.0
        return g

    def sky(self, field: int, freq: np.ndarray) -> list:
        """[(flux (nchan,), l, m)] for a field."""
        c = self.cfg
        nu0 = c.band_centre_hz
        role = self.fields[field][3]
        if role == "BANDPASS":
            return [(c.bp_flux_jy * (freq / nu0) ** c.bp_spix, 0.0, 0.0)]
        if role == "PHASE":
            return [(c.phase_flux_jy * (freq / nu0) ** c.phase_spix, 0.0, 0.0)]
        if role == "CHECK":
            return [(np.full(len(freq), c.check_flux_jy), 0.0, 0.0)]
        if role == "FLUX":       # a solar system body: (flux, l, m, disk diameter in arcsec)
            disk = self.sso_disk()
            return [(disk(freq), 0.0, 0.0, disk.diameter_arcsec)]
        # the target's sources as this pointing sees them: offset from its direction
        # and attenuated by its primary beam
        ra_p, dec_p = np.radians(self.fields[field][1]), np.radians(self.fields[field][2])
        fwhm = pb_fwhm(freq, 12.0, "ALMA")
        out = []
        for flux, ra, dec in self.target_sources(freq):
            l, m = sin_offset(ra, dec, ra_p, dec_p)
            out.append((flux * pb_response(l * l + m * m, fwhm), l, m))
        return out

    def sso_ephemeris(self, mjd: np.ndarray) -> dict:
        """The body's ephemeris at times mjd (d): where it stands (SSO_POSITION_DEG) and
        its geocentric distance (AU), that of its planet from astropy."""
        from astropy.coordinates import get_body
        body = self.cfg.sso_body.lower()
        if body not in SSO_DISTANCE_OF:
            raise ValueError(f"simulator: no distance for solar system body {self.cfg.sso_body!r}; "
                             f"bodies: {', '.join(SSO_DISTANCE_OF)}")
        rho = get_body(SSO_DISTANCE_OF[body], Time(mjd, format="mjd", scale="utc")).distance.to_value(u.AU)
        return {"mjd": np.asarray(mjd, float), "ra_deg": np.full(len(mjd), SSO_POSITION_DEG[0]),
                "dec_deg": np.full(len(mjd), SSO_POSITION_DEG[1]), "rho_au": np.atleast_1d(rho)}

    def sso_disk(self):
        """The body's disk (solar_system.DiskModel) at the simulated EB's start."""
        from ..calibration import solar_system as ss
        body = ss.body_name(self.cfg.sso_body)
        rho = float(self.sso_ephemeris(np.array([self.t0 / 86400]))["rho_au"][0])
        radius = ss.mean_radius_km(ss.BODIES[body]["radii_km"])
        return ss.DiskModel(body, ss.angular_diameter_arcsec(radius, rho), ss.BODIES[body]["ld_n"],
                            mjd=self.t0 / 86400)

    def _write_ephemeris(self, ms: str, t_start: float, t_end: float) -> None:
        """The body's ephemeris table in CASA's format, attached to its FIELD row
        (FIELD column EPHEMERIS_ID, table FIELD/EPHEM<id>_<name>_<MJD0>.tab): rows every
        10 minutes from an hour before to an hour after the EB."""
        from ..calibration import solar_system as ss
        fid = len(self.fields) - 1
        body = ss.body_name(self.cfg.sso_body)
        mjd = np.arange(t_start / 86400 - 1 / 24, t_end / 86400 + 1 / 24, 1 / 144)
        eph = self.sso_ephemeris(mjd)
        with ct.table(f"{ms}/FIELD", readonly=False, ack=False) as t:
            if "EPHEMERIS_ID" not in t.colnames():
                t.addcols(ct.makescacoldesc("EPHEMERIS_ID", -1, comment="Ephemeris id, pointer to EPHEM table(s)"))
            ids = np.full(t.nrows(), -1)
            ids[fid] = 0
            t.putcol("EPHEMERIS_ID", ids)
        cols = [ct.makescacoldesc(n, 0.0) for n in ("MJD", "RA", "DEC", "Rho", "RadVel", "DiskLong", "DiskLat")]
        path = f"{ms}/FIELD/EPHEM0_{self.cfg.sso_body}_{mjd[0]:.1f}.tab"
        with ct.table(path, ct.maketabdesc(cols), nrow=len(mjd), ack=False) as t:
            for col, key in (("MJD", "mjd"), ("RA", "ra_deg"), ("DEC", "dec_deg"), ("Rho", "rho_au")):
                t.putcol(col, eph[key])
            rate = np.gradient(eph["rho_au"], mjd)
            t.putcol("RadVel", rate)
            t.putcol("DiskLong", np.zeros(len(mjd)))
            t.putcol("DiskLat", np.zeros(len(mjd)))
            # the keywords and table type of CASA's ephemeris tables (an IERS-style table of
            # a 'Comet'), which CASA's measures insist on, and units as QuantumUnits
            t.putkeywords({"VS_CREATE": "2026/01/01/00:00", "VS_DATE": "2026/01/01/00:00",
                           "VS_TYPE": "Table of comet/planetary positions", "VS_VERSION": "0004.0001",
                           "NAME": self.cfg.sso_body, "MJD0": float(mjd[0]) - 1 / 144, "dMJD": 1 / 144,
                           "GeoDist": 0.0, "GeoLat": 0.0, "GeoLong": 0.0, "obsloc": "GEOCENTRIC",
                           "posrefsys": "ICRF/J2000.0",
                           "earliest": {"type": "epoch", "refer": "UTC", "m0": {"unit": "d", "value": float(mjd[0])}},
                           "latest": {"type": "epoch", "refer": "UTC", "m0": {"unit": "d", "value": float(mjd[-1])}},
                           "radii": {"value": np.array(ss.BODIES[body]["radii_km"]), "unit": "km"},
                           "meanrad": {"value": ss.mean_radius_km(ss.BODIES[body]["radii_km"]), "unit": "km"}})
            for col, unit in (("MJD", "d"), ("RA", "deg"), ("DEC", "deg"), ("Rho", "AU"), ("RadVel", "AU/d"),
                              ("DiskLong", "deg"), ("DiskLat", "deg")):
                t.putcolkeyword(col, "QuantumUnits", [unit])
            t.putinfo({"type": "IERS", "subType": "Comet", "readme": "almapipe simulate: the body stands still"})

    # ------------------------------------------------------------ scan plan
    def scan_plan(self) -> list:
        c = self.cfg
        plan = [("ATMOSPHERE", 0, c.atm_scan_s), ("BANDPASS", 0, c.bandpass_scan_s), ("ATMOSPHERE", 1, c.atm_scan_s)]
        if c.sso_body:          # Tsys on the body, then the body (the flux calibrator)
            sso = len(self.fields) - 1
            plan[2:2] = [("ATMOSPHERE", sso, c.atm_scan_s), ("FLUX", sso, c.sso_scan_s)]
        npt = max(c.mosaic_pointings, 1)
        for k in range(c.target_scans):
            if k == 0:
                plan += [("ATMOSPHERE", 3, c.atm_scan_s)]          # Tsys on the target itself
            # a mosaic's pointings one after the other, sharing the target scan's time
            plan += [("PHASE", 1, c.phase_scan_s)] + [("TARGET", 3 + j, c.target_scan_s / npt) for j in range(npt)]
            if k == c.target_scans // 2:
                plan += [("ATMOSPHERE", 1, c.atm_scan_s), ("ATMOSPHERE", 2, c.atm_scan_s),
                         ("CHECK", 2, c.check_scan_s)]
        plan += [("PHASE", 1, c.phase_scan_s), ("ATMOSPHERE", 1, c.atm_scan_s)]
        return plan

    # ------------------------------------------------------------ writing
    def write(self, out_dir: str, name: str = "sim") -> dict:
        c = self.cfg
        os.makedirs(out_dir, exist_ok=True)
        ms = os.path.join(out_dir, f"{name}.ms")
        if os.path.exists(ms):
            shutil.rmtree(ms)
        n = c.nant
        a1, a2 = np.triu_indices(n, 0)             # with auto-correlations, as ALMA records them
        nbl = len(a1)
        plan = self.scan_plan()
        total_s = sum(p[2] for p in plan) + 10 * len(plan)
        t0 = self.t0
        # spws of different shapes share the main table (WVR: 4 channels x 1 correlation,
        # channel averages: 1 x 2, Tsys: tsys_nchan x 2): DATA has no fixed shape
        new_ms(ms, None, None)
        modes = {**OBS_MODES, **SSO_MODES} if c.sso_body else OBS_MODES
        states = list(modes)
        fill_table(f"{ms}/STATE", {"OBS_MODE": [modes[s] for s in states], "SIG": [True] * len(states),
                                   "REF": [False] * len(states), "CAL": [0.0] * len(states),
                                   "LOAD": [0.0] * len(states), "SUB_SCAN": [1] * len(states),
                                   "FLAG_ROW": [False] * len(states)})
        diam = np.full(n, 12.0)
        fill_table(f"{ms}/ANTENNA", {"NAME": self.antenna_names(),
                                     "STATION": self.pads, "POSITION": self.xyz, "OFFSET": np.zeros((n, 3)),
                                     "DISH_DIAMETER": diam, "TYPE": ["GROUND-BASED"] * n, "MOUNT": ["ALT-AZ"] * n,
                                     "FLAG_ROW": np.zeros(n, bool)})
        nf = len(self.fields)
        dirs = np.radians(np.array([[f[1], f[2]] for f in self.fields]))[:, None, :]
        fill_table(f"{ms}/FIELD", {"NAME": [f[0] for f in self.fields], "CODE": ["none"] * nf, "TIME": np.full(nf, t0),
                                   "NUM_POLY": np.zeros(nf, int), "PHASE_DIR": dirs, "DELAY_DIR": dirs,
                                   "REFERENCE_DIR": dirs, "SOURCE_ID": np.arange(nf), "FLAG_ROW": np.zeros(nf, bool)})
        if c.sso_body:
            self._write_ephemeris(ms, t0, t0 + total_s)
        set_direction_frame(ms, "ICRS")      # as importasdm labels ALMA's directions
        self._write_spectral_setup(ms)
        fill_table(f"{ms}/FEED", {
            "ANTENNA_ID": np.arange(n), "FEED_ID": np.zeros(n, int), "SPECTRAL_WINDOW_ID": np.full(n, -1),
            "TIME": np.full(n, t0), "INTERVAL": np.zeros(n), "NUM_RECEPTORS": np.full(n, 2), "BEAM_ID": np.full(n, -1),
            "BEAM_OFFSET": np.zeros((n, 2, 2)), "POLARIZATION_TYPE": np.array([["X", "Y"]] * n),
            "POL_RESPONSE": np.tile(np.eye(2, dtype=complex), (n, 1, 1)), "POSITION": np.zeros((n, 3)),
            "RECEPTOR_ANGLE": np.zeros((n, 2))})
        fill_table(f"{ms}/PROCESSOR", {"TYPE": ["CORRELATOR"], "SUB_TYPE": ["ALMA_CORRELATOR_MODE"], "TYPE_ID": [0],
                                       "MODE_ID": [0], "FLAG_ROW": [False]})

        syscal_rows, wvr_rows, truth_rows = [], [], {"shadowed_rows": 0, "rows": 0, "online_rows": 0}
        untracked_rows = []
        phase_scans = [i for i, p in enumerate(plan) if p[0] == "PHASE"]
        online_scans = phase_scans[1:1 + c.online_flags]     # an antenna off source from these scans on
        online_ant = min(2, n - 2)
        t = t0
        scan_no = 0
        t_end_est = self.t_end_est = t0 + total_s
        with ct.table(ms, readonly=False, ack=False) as main:
            for kind, fid, dur in plan:
                scan_no += 1
                nint = max(int(round(dur / c.integration_s)), 1)
                times = t + (np.arange(nint) + 0.5) * c.integration_s
                t_frac = (times - t0) / (t_end_est - t0)
                ra, dec = np.radians(self.fields[fid][1]), np.radians(self.fields[fid][2])
                gast = Time(times / 86400, format="mjd", scale="utc").sidereal_time("apparent", "greenwich").rad
                el = elevation(gast, ra, dec)
                auvw = antenna_uvw(self.xyz, gast, ra, dec)                   # (nt, nant, 3)
                uvw = (auvw[:, a1] - auvw[:, a2]).reshape(-1, 3)
                ti = np.repeat(np.arange(nint), nbl)
                b1, b2 = np.tile(a1, nint), np.tile(a2, nint)
                auto_t = np.repeat(times, n)
                ants = np.tile(np.arange(n), nint)
                autos = {"TIME": auto_t, "ANTENNA1": ants, "ANTENNA2": ants, "UVW": np.zeros((len(auto_t), 3))}
                if kind == "ATMOSPHERE":
                    # Tsys is measured on the Tsys (TDM) spws only: SYSCAL rows keyed to them,
                    # and the scan's own data in those spws (auto-correlations: its
                    # cross-correlations carry no calibration); no science spw data
                    for s in range(c.nspw):
                        mean_tsys = self.tsys_at(self.tsys_freqs[s], t_frac, el).mean(axis=0)
                        for a in range(n):
                            syscal_rows.append((a, self.tsys_spw_ids[s], float(times.mean()),
                                                float(nint * c.integration_s), np.stack([mean_tsys[a], mean_tsys[a]], axis=1)))
                        width = c.tsys_width_hz / c.tsys_nchan
                        self._put(main, dict(autos, DATA=np.ones((len(auto_t), c.tsys_nchan, 2), np.complex64)),
                                  fid, scan_no, self.tsys_spw_ids[s], states.index(kind), width)
                        self._put(main, dict(autos, DATA=np.ones((len(auto_t), 1, 2), np.complex64)),
                                  fid, scan_no, self.tsys_spw_ids[s] + 1, states.index(kind), width * c.tsys_nchan)
                    t = times[-1] + c.integration_s / 2 + 10.0
                    continue
                tsys_all = [self.tsys(s, t_frac, el) for s in range(c.nspw)]
                truth_rows.setdefault("scans", []).append(
                    {"scan": scan_no, "field": self.fields[fid][0], "field_id": fid, "kind": kind,
                     "start_mjd_s": float(times[0] - c.integration_s / 2), "end_mjd_s": float(times[-1] + c.integration_s / 2)})
                if scan_no - 1 in online_scans:
                    self.online.append((online_ant, float(t), float(t + c.online_flag_s)))
                path = self.path_mm(times - t0)                                    # (nt, nant)
                untracked = self.path_mm(times - t0, untracked=True)
                wvr_rows.append((times, path))
                # the radiometers: 4-channel brightness temperatures as auto-correlations
                # of the WVR spw (one correlation), as importasdm writes them
                self._put(main, dict(autos, DATA=self.wvr_brightness(path).reshape(-1, 4, 1).astype(np.complex64)),
                          fid, scan_no, self.wvr_spw, states.index(kind), 1e9)
                untracked_rows.append(untracked)
                off_source = np.zeros(len(uvw), bool)                             # rows of an antenna off source
                for ant, ta, tb_ in self.online:
                    half = c.integration_s / 2          # an integration that overlaps the range
                    hit = (times + half >= ta) & (times - half <= tb_)
                    off_source |= np.repeat(hit, nbl) & ((b1 == ant) | (b2 == ant))
                shadow = shadow_mask(np.repeat(times, nbl), b1, b2, uvw, diam)
                truth_rows["shadowed_rows"] += int(shadow.sum())
                # source direction unit vector (ITRF) for the position-error phases
                hg = gast - ra                                                      # Greenwich hour angle
                s_vec = np.stack([np.cos(dec) * np.cos(hg), -np.cos(dec) * np.sin(hg),
                                  np.full(nint, np.sin(dec))], axis=1)            # (nt, 3) Earth-fixed
                pos_delay = s_vec @ self.pos_err.T                                  # (nt, nant) m
                g_el = self.gains(t_frac)                                           # (nt, nant, 2)
                state = states.index(kind)
                burst = None
                if c.target_burst is not None and kind == "TARGET" and "target_burst" not in truth_rows:
                    ba, bb, secs = c.target_burst
                    in_time = np.repeat(times, nbl) <= times[0] - c.integration_s / 2 + secs
                    burst = in_time & (((b1 == ba) & (b2 == bb)) | ((b1 == bb) & (b2 == ba)))
                    truth_rows["target_burst"] = {"antennas": [int(ba), int(bb)], "scan": scan_no,
                                                  "start_mjd_s": float(times[0] - c.integration_s / 2),
                                                  "end_mjd_s": float(times[0] - c.integration_s / 2 + secs),
                                                  "rows_per_spw": int(burst.sum())}
                for s in range(c.nspw):
                    freq = self.freqs[s]
                    lam_inv = freq / C
                    vsky = np.zeros((len(uvw), c.nchan), complex)
                    for flux, l, m, *disk in self.sky(fid, freq):
                        nn = np.sqrt(1 - l * l - m * m) - 1
                        ph = 2j * np.pi * (uvw[:, 0:1] * l + uvw[:, 1:2] * m + uvw[:, 2:3] * nn) * lam_inv[None]
                        vsky += flux[None, :] * np.exp(ph) * (self._disk_factor(uvw, lam_inv, disk[0]) if disk else 1)
                    # antenna-based corruptions: atmosphere + position errors (+ electronics, bandpass)
                    phi = 2 * np.pi * (((path + untracked) / 1e3)[:, :, None] + pos_delay[:, :, None]) * \
                        lam_inv[None, None, :]
                    atm = np.exp(1j * phi)                                           # (nt, nant, nchan)
                    tsys = tsys_all[s]                                               # (nt, nant, nchan)
                    ga = g_el[:, :, None, :] * self.bandpass[s][None] * atm[..., None] / \
                        np.sqrt(c.jy_per_k * tsys)[..., None]                        # (nt, nant, nchan, 2)
                    ga = ga * np.exp(1j * self.spw_phase[s])[None, :, None, :]
                    if c.bad_gain is not None and s == c.bad_gain[1]:
                        ga[:, c.bad_gain[0]] *= c.bad_gain[2]                       # Tsys does not see it
                    vis = ga[ti, b1] * np.conj(ga[ti, b2]) * vsky[:, :, None]
                    vis[off_source] = 0.0                 # off source: noise only
                    # radiometer equation: noise of a correlation coefficient
                    # before the window (a channel's noise is 1 / sqrt(2 EBW tau) after it)
                    sigma = 1 / np.sqrt(2 * self.chan_widths[s] * c.integration_s)
                    noise = sigma * self.channel_noise(vis.shape, self.rng)
                    vis = vis + noise
                    if burst is not None:
                        vis[burst] += 30 * sigma * (1 + 1j)
                    vis[b1 == b2] = 1.0                 # normalised auto-correlations
                    vis[shadow] *= 0.3                  # a shadowed dish collects less signal
                    for sp, chn in self.bad_channels:
                        if sp == s:
                            vis[:, chn] += 20 * sigma * (1 + 1j)
                    rows = {"TIME": np.repeat(times, nbl), "ANTENNA1": b1, "ANTENNA2": b2, "UVW": uvw}
                    self._put(main, dict(rows, DATA=vis.astype(np.complex64)), fid, scan_no,
                              self.science_spw_ids[s], state, self.chan_widths[s])
                    # its channel average (ALMA's CH_AVG spw: the inner 15/16 of the band)
                    edge = max(c.nchan // 32, 0)
                    avg = vis[:, edge:c.nchan - edge].mean(axis=1, keepdims=True)
                    self._put(main, dict(rows, DATA=avg.astype(np.complex64)), fid, scan_no,
                              self.science_spw_ids[s] + 1, state, self.spw_widths[s])
                    truth_rows["rows"] += len(uvw)
                    truth_rows["online_rows"] += int((off_source & (b1 != b2)).sum())
                t = times[-1] + c.integration_s / 2 + 10.0
        fill_table(f"{ms}/OBSERVATION", {"TELESCOPE_NAME": ["ALMA"], "OBSERVER": ["almapipe simulate"],
                                         "PROJECT": ["uid://S000/X00/X00"], "TIME_RANGE": np.array([[t0, t]]),
                                         "RELEASE_DATE": [0.0], "SCHEDULE_TYPE": [""], "FLAG_ROW": [False]})
        with ct.table(ms, ack=False) as main:               # the rows of the science spws
            truth_rows["all_rows"] = int(np.isin(main.getcol("DATA_DESC_ID"), self.science_spw_ids).sum())
        self._write_syscal(ms, syscal_rows)
        self._write_flag_cmd(ms)
        wvr = {"times": np.concatenate([r[0] for r in wvr_rows]), "path_mm": np.concatenate([r[1] for r in wvr_rows])}
        wvr["untracked_mm"] = np.concatenate(untracked_rows)
        antpos = os.path.join(out_dir, "antennapos.csv")
        with open(antpos, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["antenna", "xoffset_m", "yoffset_m", "zoffset_m", "comment"])
            names = self.antenna_names()
            for a in np.flatnonzero(np.abs(self.pos_err).sum(axis=1)):
                w.writerow([names[a], *(f"{x:.6f}" for x in self.pos_err[a]), "position correction"])
        # the flux calibrator's catalogue flux, as ALMA's pipeline receives it in flux.csv
        flux_csv = os.path.join(out_dir, "flux.csv")
        # in ALMA's columns: per MS, field and science spw, Stokes I at the spw's centre
        with open(flux_csv, "w") as f:
            f.write("ms,field,spw,I,Q,U,V,spix,uvmin,uvmax,comment\n")
            for s, sid in enumerate(self.science_spw_ids):
                nu = float(np.mean(self.freqs[s]))
                flux = c.bp_flux_jy * (nu / c.band_centre_hz) ** c.bp_spix * (1 + c.catalogue_flux_error)
                f.write(f"{name}.ms,{FIELDS[0][0]},{sid},{flux:.6f},0.0,0.0,0.0,{c.bp_spix},0.0,0.0,"
                        f"\"calibrator catalogue, {nu / 1e9:.3f} GHz\"\n")
        truth = self._truth(out_dir, names, truth_rows, wvr)
        return {"ms": ms, "antennapos": antpos, "flux_csv": flux_csv, "truth": truth}

    def spectral_windows(self) -> list:
        """(id, name, channel frequencies, signed channel width, baseband) of every spw,
        in the order and with the names importasdm gives them."""
        c = self.cfg
        wvr = 183.31e9 + np.array(WVR_OFFSETS_GHZ) * 1e9
        out = [(self.wvr_spw, "WVR#NOMINAL", wvr, np.array([0.16e9, 0.75e9, 1.25e9, 1.5e9]), 0)]
        for s in range(c.nspw):
            sign = -1.0 if self.lsb[s] else 1.0
            bb = f"ALMA_RB_06#BB_{s + 1}#SW-01"
            out.append((self.tsys_spw_ids[s], f"X0000000001#{bb}#FULL_RES", self.tsys_freqs[s],
                        np.full(c.tsys_nchan, sign * c.tsys_width_hz / c.tsys_nchan), s + 1))
            out.append((self.tsys_spw_ids[s] + 1, f"X0000000001#{bb}#CH_AVG", np.array([self.spw_centres[s]]),
                        np.array([sign * c.tsys_width_hz * 0.9375]), s + 1))
        for s in range(c.nspw):
            sign = -1.0 if self.lsb[s] else 1.0
            bb = f"ALMA_RB_06#BB_{s + 1}#SW-01"
            out.append((self.science_spw_ids[s], f"X0000000002#{bb}#FULL_RES", self.freqs[s],
                        np.full(c.nchan, sign * self.chan_widths[s]), s + 1))
            out.append((self.science_spw_ids[s] + 1, f"X0000000002#{bb}#CH_AVG", np.array([self.spw_centres[s]]),
                        np.array([sign * self.spw_widths[s] * 0.9375]), s + 1))
        return sorted(out, key=lambda x: x[0])

    def channel_noise(self, shape: tuple, rng: np.random.Generator) -> np.ndarray:
        """Complex noise (rows, channels, correlations) of unit variance before the
        correlator's window: Hanning-smoothed along the channels when the config says
        so, each channel's variance then 3/8 (the radiometer equation with the effective
        bandwidth) and the noise of a sum over many channels as it was before smoothing."""
        def white(shape):
            return (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)
        if not self.cfg.hanning:
            return white(shape)
        nrow, nchan, ncorr = shape
        w = white((nrow, nchan + 2, ncorr))
        return 0.25 * w[:, :-2] + 0.5 * w[:, 1:-1] + 0.25 * w[:, 2:]

    def effective_bw_ratio(self, spw_name: str) -> float:
        """EFFECTIVE_BW / CHAN_WIDTH of a spw: 8/3 for a Hanning-smoothed one (the science
        spws and the TDM Tsys spws; not the channel averages)."""
        return 8.0 / 3.0 if self.cfg.hanning and spw_name.endswith("#FULL_RES") else 1.0

    def _write_spectral_setup(self, ms: str) -> None:
        """SPECTRAL_WINDOW (channel counts differ per row), POLARIZATION (the WVR's one
        correlation first, as in ALMA's EBs, then XX, YY) and one DATA_DESCRIPTION per spw.
        NET_SIDEBAND as importasdm writes ALMA's enumeration: 1 lower, 2 upper sideband."""
        spws = self.spectral_windows()
        with ct.table(f"{ms}/SPECTRAL_WINDOW", readonly=False, ack=False) as t:
            t.addrows(len(spws))
            for i, (sid, name, freq, width, bb) in enumerate(spws):
                assert i == sid
                t.putcell("NAME", i, name)
                t.putcell("NUM_CHAN", i, len(freq))
                t.putcell("CHAN_FREQ", i, np.asarray(freq, float))
                t.putcell("CHAN_WIDTH", i, np.asarray(width, float))
                # a Hanning-smoothed channel's resolution (FWHM) is about two channels
                ratio = self.effective_bw_ratio(name)
                t.putcell("EFFECTIVE_BW", i, np.abs(width) * ratio)
                t.putcell("RESOLUTION", i, np.abs(width) * (2.0 if ratio > 1 else 1.0))
                t.putcell("REF_FREQUENCY", i, float(freq[0]))
                t.putcell("TOTAL_BANDWIDTH", i, float(np.abs(width).sum()))
                t.putcell("MEAS_FREQ_REF", i, FREQ_FRAMES["TOPO"])
                t.putcell("NET_SIDEBAND", i, 1 if width[0] < 0 else 2)
                t.putcell("FREQ_GROUP", i, 0)
                t.putcell("FREQ_GROUP_NAME", i, "none")
                t.putcell("IF_CONV_CHAIN", i, 0)
                t.putcell("FLAG_ROW", i, False)
                if "BBC_NO" in t.colnames():
                    t.putcell("BBC_NO", i, bb)
        fill_table(f"{ms}/POLARIZATION", {"NUM_CORR": [1], "CORR_TYPE": np.array([[CORR_CODES["XX"]]]),
                                          "CORR_PRODUCT": np.array([[[0, 0]]]), "FLAG_ROW": [False]})
        fill_table(f"{ms}/POLARIZATION", {"NUM_CORR": [2], "CORR_TYPE": np.array([[CORR_CODES["XX"], CORR_CODES["YY"]]]),
                                          "CORR_PRODUCT": np.array([[[0, 0], [1, 1]]]), "FLAG_ROW": [False]})
        n = len(spws)
        fill_table(f"{ms}/DATA_DESCRIPTION", {"SPECTRAL_WINDOW_ID": list(range(n)),
                                              "POLARIZATION_ID": [0 if i == self.wvr_spw else 1 for i in range(n)],
                                              "FLAG_ROW": [False] * n})

    def true_tsys(self, spw: int, time: float, field: int) -> np.ndarray:
        """The model Tsys (nant, nchan) on the channels of science spw `spw` (its id in
        the MS) at a time, looking at a field (for tests)."""
        t_frac = np.array([(time - self.t0) / (self.t_end_est - self.t0)])
        ra, dec = np.radians(self.fields[field][1]), np.radians(self.fields[field][2])
        gast = Time(np.array([time]) / 86400, format="mjd", scale="utc").sidereal_time("apparent", "greenwich").rad
        return self.tsys(self.science_index(spw), t_frac, elevation(gast, ra, dec))[0]

    def _disk_factor(self, uvw: np.ndarray, lam_inv: np.ndarray, diameter_arcsec: float) -> np.ndarray:
        """(nrow, nchan) visibility of a disk of unit flux (the solar system body)."""
        from ..calibration.solar_system import disk_visibility, body_name, BODIES
        q = np.hypot(uvw[:, 0], uvw[:, 1])[:, None] * lam_inv[None, :]
        return disk_visibility(q, diameter_arcsec, BODIES[body_name(self.cfg.sso_body)]["ld_n"])

    def _put(self, main, cols: dict, fid: int, scan: int, spw: int, state: int, chan_width_hz: float = 1e6) -> None:
        """Append rows of spw (= data description) `spw` to the main table; cols has TIME,
        ANTENNA1/2, UVW, DATA (nrow, nchan, ncorr)."""
        c = self.cfg
        nrow = len(cols["TIME"])
        _, nchan, ncorr = cols["DATA"].shape
        full = dict(cols, TIME_CENTROID=cols["TIME"], INTERVAL=np.full(nrow, c.integration_s),
                    EXPOSURE=np.full(nrow, c.integration_s), FIELD_ID=np.full(nrow, fid),
                    SCAN_NUMBER=np.full(nrow, scan), FLAG=np.zeros((nrow, nchan, ncorr), bool),
                    WEIGHT=np.full((nrow, ncorr), 2 * abs(chan_width_hz) * c.integration_s / 1e6, np.float32),
                    SIGMA=np.ones((nrow, ncorr), np.float32), DATA_DESC_ID=np.full(nrow, spw),
                    ARRAY_ID=np.zeros(nrow, int), OBSERVATION_ID=np.zeros(nrow, int),
                    PROCESSOR_ID=np.zeros(nrow, int), STATE_ID=np.full(nrow, state), FEED1=np.zeros(nrow, int),
                    FEED2=np.zeros(nrow, int), FLAG_ROW=np.zeros(nrow, bool))
        start = main.nrows()
        main.addrows(nrow)
        for k, v in full.items():
            main.putcol(k, v, startrow=start, nrow=nrow)

    def _write_syscal(self, ms: str, rows: list) -> None:
        desc = ct.makearrcoldesc("TSYS_SPECTRUM", 0.0, ndim=2, valuetype="float",
                                 comment="System temperature spectrum (K)")
        path = f"{ms}/SYSCAL"
        t = ct.default_ms_subtable("SYSCAL", path, ct.maketabdesc([desc]))
        t.close()
        with ct.table(ms, readonly=False, ack=False) as main:
            main.putkeyword("SYSCAL", "Table: " + os.path.abspath(path))
        with ct.table(path, readonly=False, ack=False) as t:
            t.addrows(len(rows))
            t.putcol("ANTENNA_ID", np.array([r[0] for r in rows]))
            t.putcol("FEED_ID", np.zeros(len(rows), int))
            t.putcol("SPECTRAL_WINDOW_ID", np.array([r[1] for r in rows]))
            t.putcol("TIME", np.array([r[2] for r in rows]))
            t.putcol("INTERVAL", np.array([r[3] for r in rows]))
            t.putcol("TSYS_SPECTRUM", np.array([r[4] for r in rows], np.float32))

    def _write_flag_cmd(self, ms: str) -> None:
        """Online flags as ALMA's importasdm writes them: one FLAG_CMD row per
        antenna and time range, a flagdata command, TYPE 'ONLINE', not applied."""
        names = self.antenna_names()
        cmds = [f"antenna='{names[a]}&&*' timerange='{casa_time(t0)}~{casa_time(t1)}'" for a, t0, t1 in self.online]
        rows = len(cmds)
        with ct.table(f"{ms}/FLAG_CMD", readonly=False, ack=False) as t:
            t.addrows(rows)
            if rows:
                t.putcol("TIME", np.array([(a + b) / 2 for _, a, b in self.online]))
                t.putcol("INTERVAL", np.array([b - a for _, a, b in self.online]))
                t.putcol("TYPE", ["ONLINE"] * rows)
                t.putcol("REASON", ["ANTENNA_NOT_ON_SOURCE"] * rows)
                t.putcol("LEVEL", np.zeros(rows, int))
                t.putcol("SEVERITY", np.zeros(rows, int))
                t.putcol("APPLIED", np.zeros(rows, bool))
                t.putcol("COMMAND", cmds)

    def antenna_names(self) -> list:
        return [f"DA{41 + i}" if i % 2 else f"DV{i + 1:02d}" for i in range(self.cfg.nant)]

    def wvr_brightness(self, path_mm: np.ndarray) -> np.ndarray:
        """WVR brightness temperatures (nt, nant, 4) in K for a path (nt, nant) in mm; the
        dead antenna's radiometer gives noise. Its own random stream, so the visibilities
        do not depend on how the WVR data are drawn."""
        t_sky = np.array([250.0, 200.0, 140.0, 90.0])
        tb = t_sky[None, None, :] + path_mm[:, :, None] * np.array(WVR_DTDL)[None, None, :]
        tb = tb + self.wvr_rng.normal(size=tb.shape) * 0.01
        if self.dead >= 0:
            tb[:, self.dead] = self.wvr_rng.normal(size=tb[:, self.dead].shape) * 5 + 200
        return tb

    def _sso_truth(self) -> dict:
        """The solar system flux calibrator as injected: body, disk, flux per spw."""
        disk = self.sso_disk()
        rho = float(self.sso_ephemeris(np.array([self.t0 / 86400]))["rho_au"][0])
        return {"body": self.cfg.sso_body, "field_id": len(self.fields) - 1, "diameter_arcsec": disk.diameter_arcsec,
                "distance_au": rho, "ld_n": disk.ld_n,
                "flux_jy_per_spw": {str(self.science_spw_ids[s]): float(disk(np.array([fc]))[0])
                                    for s, fc in enumerate(self.spw_centres)}}

    def _truth(self, out_dir: str, names: list, rows: dict, wvr: dict) -> str:
        c = self.cfg
        np.savez_compressed(os.path.join(out_dir, "truth.npz"), bandpass=self.bandpass,
                            gain_amp0=self.gain_amp0, gain_drift=self.gain_drift, gain_phase0=self.gain_phase0,
                            pos_err_m=self.pos_err, wvr_times=wvr["times"], path_mm=wvr["path_mm"],
                            untracked_path_mm=wvr["untracked_mm"], spw_phase_rad=self.spw_phase,
                            tsys_scale=self.tsys_scale, spw_freqs=np.array(self.freqs))
        total = wvr["path_mm"] + wvr["untracked_mm"]
        # over all antenna pairs: what a perfect WVR correction would do to baseline phases
        i, j = np.triu_indices(total.shape[1], 1)
        injected = float(np.std(total[:, i] - total[:, j]) / np.std(wvr["untracked_mm"][:, i] - wvr["untracked_mm"][:, j]))
        truth = {
            "config": asdict(c), "antennas": names, "pads": self.pads,
            "dead_antenna": names[self.dead] if self.dead >= 0 else None,
            "bad_channels": [{"spw": self.science_spw_ids[s], "chan": ch} for s, ch in self.bad_channels],
            # spectral windows by id: science (lower sideband ones descend in frequency),
            # Tsys, channel averages and the WVR spw, as importasdm numbers them
            "science_spws": list(self.science_spw_ids), "wvr_spw": self.wvr_spw,
            "lsb_spws": [self.science_spw_ids[s] for s in range(c.nspw) if self.lsb[s]],
            "spws": [{"id": i, "name": nm, "nchan": len(f), "chan_width_hz": float(w[0])}
                     for i, nm, f, w, _ in self.spectral_windows()],
            "position_errors_m": {names[a]: self.pos_err[a].tolist() for a in np.flatnonzero(np.abs(self.pos_err).sum(1))},
            "wvr_dTdL_K_per_mm": list(WVR_DTDL), "jy_per_k": c.jy_per_k,
            "wvr_injected_improvement": injected,
            "online_flags": [{"antenna": names[a], "start_mjd_s": t0, "end_mjd_s": t1} for a, t0, t1 in self.online],
            "online_rows": rows["online_rows"], "all_rows": rows["all_rows"], "scans": rows.get("scans", []),
            "spw_widths_hz": self.spw_widths.tolist(),
            "tsys_spw_map": {str(self.tsys_spw_ids[s]): self.science_spw_ids[s] for s in range(c.nspw)},
            "sky": {FIELDS[f][0]: [{"flux_jy_at_band_centre": float(fl[len(fl) // 2]) if hasattr(fl, "__len__") else fl,
                                    "l_arcsec": float(np.degrees(l) * 3600), "m_arcsec": float(np.degrees(m) * 3600)}
                                   for fl, l, m in self.sky(f, np.array([c.band_centre_hz] * 3))]
                    for f in range(len(FIELDS))},
            # the target's sources on the sky (each pointing sees them through its primary beam)
            "target_sources": [{"flux_jy": float(fl[0]), "ra_deg": float(np.degrees(ra)), "dec_deg": float(np.degrees(dec)),
                                "spix": spix}
                               for (fl, ra, dec), spix in zip(self.target_sources(np.array([c.band_centre_hz])),
                                                              self.target_source_spix())],
            "pointings": [{"field_id": i, "ra_deg": f[1], "dec_deg": f[2]} for i, f in enumerate(self.fields)
                          if f[3] == "TARGET"],
            "spectral_index": {FIELDS[0][0]: c.bp_spix, FIELDS[1][0]: c.phase_spix, FIELDS[2][0]: 0.0},
            "line": {"field": "Target", "spw": self.science_spw_ids[0], "centre_hz": float(self.spw_centres[0]),
                     "sigma_hz": 0.06 * float(self.spw_widths[0]), "peak_jy": c.target_line_jy},
            "shadowed_rows_per_spw": rows["shadowed_rows"], "rows": rows["rows"],
            "flux_calibrator": self._sso_truth() if c.sso_body else None,
            "bad_gain": None if c.bad_gain is None else {"antenna": names[c.bad_gain[0]],
                                                         "spw": self.science_spw_ids[c.bad_gain[1]],
                                                         "factor": c.bad_gain[2]},
            "target_burst": None if "target_burst" not in rows else
            dict(rows["target_burst"], antennas=[names[a] for a in rows["target_burst"]["antennas"]]),
            "start_elevation_deg": self.start_elevation_deg,
            "conventions": "V_12 = g_1 conj(g_2) V_sky; uvw = x1 - x2 projected; raw = Jy / (JyperK sqrt(Tsys1 Tsys2))",
        }
        path = os.path.join(out_dir, "truth.json")
        with open(path, "w") as f:
            json.dump(truth, f, indent=1)
        return path


def casa_time(mjd_s: float) -> str:
    """MJD seconds (UTC) as CASA writes times in flag commands: 2026/05/01/01:02:03.456."""
    iso = Time(mjd_s / 86400, format="mjd", scale="utc", precision=3).iso     # 2026-05-01 01:02:03.456
    return iso.replace("-", "/").replace(" ", "/")


def simulate(out_dir: str, preset: str = "small", name: str = "sim", **overrides) -> dict:
    return Simulator(SimConfig.preset(preset, **overrides)).write(out_dir, name)
