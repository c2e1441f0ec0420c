"""Flux density and visibility models of solar system flux calibrators (setjy).

The model follows the 'Butler-JPL-Horizons 2012' standard of CASA (Butler 2012,
ALMA Memo 594, "Flux Density Models for Solar System Bodies in CASA"):

* a body is a disk of one disk-averaged brightness temperature Tb(nu);
* its flux density is the Planck brightness of Tb less that of the cosmic
  background (2.725 K) times the disk's solid angle,
  S = [B(Tb) - B(T_cmb)] * pi * R_mean^2 / D^2, with R_mean = sqrt(R_eq * R_p,app),
  R_p,app the polar radius as seen from the sub-observer latitude and D the
  geocentric distance (from the body's ephemeris table when the MS has one);
* its sky brightness is a uniform disk of that mean radius (CASA's setjy makes a
  'disk' component), whose visibility at uv distance q (wavelengths) is
  S * 2 J1(x) / x, x = pi * theta * q, theta the angular diameter.

The power-law limb-darkened disk, I(r) ~ (1 - r^2/R^2)^(n/2), has the visibility
S * Gamma(nu + 1) (2/x)^nu J_nu(x), nu = n/2 + 1 (n = 0 is the uniform disk); the
Butler models use n = 0 for every body, kept here as each body's ld_n.

The brightness temperatures are Butler's 2012 tables (as distributed with CASA's
data), kept over 30-1000 GHz in almapipe/data/butler2012_tb.csv.gz (Tb vs
frequency per body) and almapipe/data/butler2012_mars_tb.csv.gz (Mars: Tb vs time
and frequency, 2010-2020); see docs/decisions/0007.

Only kernels here: no stage code. setjy (almapipe.stages.calibration) builds a
:class:`DiskModel` per flux calibrator; the solvers call its visibility().
"""
from __future__ import annotations

import csv
import glob
import gzip
import os
from dataclasses import dataclass

import numpy as np
from scipy.special import gamma, jv

H = 6.62607015e-34          # J s
K_B = 1.380649e-23          # J / K
C = 299792458.0             # m / s
T_CMB = 2.725               # K, the background Butler's models subtract
AU_M = 1.495978707e11       # m
RAD_ARCSEC = 180 / np.pi * 3600

# Radii (km): equatorial a, equatorial b, polar c (IAU WGCCRE 2009, Archinal et al.
# 2011, the 'radii' that CASA's JPL-Horizons ephemeris tables carry); Juno, not in
# the IAU report, from its shape model (320 x 267 x 200 km). ld_n: limb-darkening
# exponent of the disk (0, uniform, for all bodies in Butler 2012).
BODIES = {
    "mars": {"radii_km": (3396.19, 3396.19, 3376.20), "ld_n": 0.0, "kind": "planet"},
    "uranus": {"radii_km": (25559.0, 25559.0, 24973.0), "ld_n": 0.0, "kind": "planet"},
    "neptune": {"radii_km": (24764.0, 24764.0, 24341.0), "ld_n": 0.0, "kind": "planet"},
    "io": {"radii_km": (1829.4, 1819.3, 1815.7), "ld_n": 0.0, "kind": "moon of Jupiter"},
    "europa": {"radii_km": (1562.6, 1560.3, 1559.5), "ld_n": 0.0, "kind": "moon of Jupiter"},
    "ganymede": {"radii_km": (2631.2, 2631.2, 2631.2), "ld_n": 0.0, "kind": "moon of Jupiter"},
    "callisto": {"radii_km": (2410.3, 2410.3, 2410.3), "ld_n": 0.0, "kind": "moon of Jupiter"},
    "titan": {"radii_km": (2575.5, 2575.5, 2575.5), "ld_n": 0.0, "kind": "moon of Saturn"},
    "ceres": {"radii_km": (487.3, 487.3, 454.7), "ld_n": 0.0, "kind": "asteroid"},
    "pallas": {"radii_km": (291.0, 278.0, 250.0), "ld_n": 0.0, "kind": "asteroid"},
    "vesta": {"radii_km": (289.0, 280.0, 229.0), "ld_n": 0.0, "kind": "asteroid"},
    "juno": {"radii_km": (160.0, 133.5, 100.0), "ld_n": 0.0, "kind": "asteroid"},
}

# Below this fraction of its flux a disk's visibility carries little of the
# flux scale and is most sensitive to the disk's exact size and shape: the
# solvers use only shorter baselines (the ALMA pipeline's uvrange for resolved
# flux calibrators).
MIN_VIS_FRACTION = 0.1

_TB_TABLE: dict | None = None
_MARS_TABLE: tuple | None = None
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "data")


def body_name(field_name: str) -> str | None:
    """The body (lower case, a key of BODIES) a field is named after, or None.
    Case-insensitive; 'Titan', 'TITAN' and 'Titan_1' are Titan."""
    n = field_name.strip().lower()
    for b in BODIES:
        if n == b or (n.startswith(b) and not n[len(b)].isalnum()):
            return b
    return None


def _data_lines(name: str):
    """The lines of a gzipped CSV in almapipe/data, less its '#' comment header."""
    with gzip.open(os.path.join(DATA_DIR, name), "rt") as f:
        return [line for line in f if not line.startswith("#")]


def tb_table() -> dict:
    """body -> (freq_hz (n,), tb_k (n,)): Butler 2012's Tb vs frequency of each body
    but Mars (almapipe/data/butler2012_tb.csv.gz)."""
    global _TB_TABLE
    if _TB_TABLE is None:
        rows: dict = {}
        for row in csv.DictReader(_data_lines("butler2012_tb.csv.gz")):
            rows.setdefault(row["body"].lower(), []).append((float(row["freq_ghz"]) * 1e9, float(row["tb_k"])))
        _TB_TABLE = {b: tuple(np.array(x) for x in zip(*sorted(v))) for b, v in rows.items()}
    return _TB_TABLE


def mars_tb_table() -> tuple:
    """(mjd (nt,), freq_hz (nf,), tb_k (nt, nf)): Butler 2012's Mars, Tb vs time (every
    2 h, 2010-2020) and frequency (almapipe/data/butler2012_mars_tb.csv.gz)."""
    global _MARS_TABLE
    if _MARS_TABLE is None:
        lines = _data_lines("butler2012_mars_tb.csv.gz")
        freq_hz = np.array([float(x) for x in lines[0].strip().split(",")[1:]]) * 1e9
        a = np.loadtxt(lines[1:], delimiter=",", ndmin=2)
        _MARS_TABLE = (a[:, 0], freq_hz, a[:, 1:])
    return _MARS_TABLE


def _check_range(body: str, f: np.ndarray, lo: float, hi: float) -> None:
    if f.size and (f.min() < lo * (1 - 1e-9) or f.max() > hi * (1 + 1e-9)):
        raise ValueError(f"{body.capitalize()}: the Butler 2012 brightness temperature table covers "
                         f"{lo / 1e9:g}-{hi / 1e9:g} GHz, not {f.min() / 1e9:.3f}-{f.max() / 1e9:.3f} GHz")


def brightness_temperature(body: str, freq_hz, mjd: float | None = None) -> np.ndarray:
    """Disk-averaged Tb (K) of a body from its Butler 2012 table, interpolated linearly
    in frequency (and, for Mars, in time: mjd, UTC, is then needed). Linear, not
    log-log: it reproduces every tabulated point, cannot overshoot between them, and on
    these grids (1-10 % steps, finer in Titan's lines) it differs from log-log
    interpolation by < 0.1 % (0.11 K). A frequency or time outside the table is an
    error naming its range."""
    f = np.asarray(freq_hz, float)
    if body == "mars":
        return _mars_tb(f, mjd)
    f_tab, t_tab = tb_table()[body]
    _check_range(body, f, f_tab[0], f_tab[-1])
    return np.interp(f, f_tab, t_tab)


def _mars_tb(f: np.ndarray, mjd: float | None) -> np.ndarray:
    """Mars: the table's Tb at each of its frequencies at mjd (linear in time), then
    linear in frequency."""
    t_mjd, f_tab, tb = mars_tb_table()
    if mjd is None:
        raise ValueError("Mars: its Butler 2012 brightness temperature varies with time; the MJD of the "
                         "observation is needed")
    if not t_mjd[0] - 1e-6 <= mjd <= t_mjd[-1] + 1e-6:
        raise ValueError(f"Mars: the Butler 2012 brightness temperature table covers MJD {t_mjd[0]:.2f}-"
                         f"{t_mjd[-1]:.2f} (2010-01-01 to 2020-12-31), not MJD {mjd:.2f}; give setjy.manual for it")
    _check_range("mars", f, f_tab[0], f_tab[-1])
    at_t = np.array([np.interp(mjd, t_mjd, tb[:, k]) for k in range(len(f_tab))])
    return np.interp(f, f_tab, at_t)


def planck_excess(tb_k, freq_hz) -> np.ndarray:
    """B(Tb) - B(T_cmb) in W m^-2 Hz^-1 sr^-1 (Butler's brightness, background removed)."""
    f = np.asarray(freq_hz, float)
    pre = 2 * H * f ** 3 / C ** 2
    return pre * (1 / np.expm1(H * f / (K_B * np.asarray(tb_k, float))) - 1 / np.expm1(H * f / (K_B * T_CMB)))


def mean_radius_km(radii_km, sub_obs_lat_deg: float = 0.0) -> float:
    """sqrt(R_eq * R_p,app): the radius of the circle of the body's apparent area
    (R_eq the mean equatorial radius, R_p,app the polar radius foreshortened by
    the sub-observer latitude), as Butler's flux densities use it."""
    a, b, c = radii_km
    req = (a + b) / 2
    lat = np.radians(sub_obs_lat_deg)
    rp_app = np.sqrt(req ** 2 * np.sin(lat) ** 2 + c ** 2 * np.cos(lat) ** 2)
    return float(np.sqrt(req * rp_app))


def angular_diameter_arcsec(radius_km: float, distance_au: float) -> float:
    return float(2 * radius_km * 1e3 / (distance_au * AU_M) * RAD_ARCSEC)


def disk_flux(tb_k, freq_hz, diameter_arcsec: float) -> np.ndarray:
    """Flux density (Jy) of a disk of brightness temperature tb_k and angular diameter."""
    omega = np.pi * (diameter_arcsec / RAD_ARCSEC / 2) ** 2
    return planck_excess(tb_k, freq_hz) * omega * 1e26


def disk_visibility(q_lambda, diameter_arcsec: float, ld_n: float = 0.0) -> np.ndarray:
    """Visibility of a disk of unit flux at uv distance q (wavelengths): 2 J1(x)/x for
    the uniform disk, Gamma(nu+1) (2/x)^nu J_nu(x), nu = ld_n/2 + 1, limb-darkened;
    x = pi theta q. Real (the disk is centred on the phase centre); negative past
    the first null."""
    x = np.pi * (diameter_arcsec / RAD_ARCSEC) * np.asarray(q_lambda, float)
    nu = ld_n / 2 + 1
    small = np.abs(x) < 1e-6
    xs = np.where(small, 1.0, x)
    return np.where(small, 1.0, gamma(nu + 1) * (2 / xs) ** nu * jv(nu, xs))


def uv_limit(diameter_arcsec: float, ld_n: float = 0.0, fraction: float = MIN_VIS_FRACTION) -> float:
    """The uv distance (wavelengths) at which the disk's visibility first falls to
    fraction of its flux: the longest baseline the solvers use on it."""
    x = np.linspace(0, 12, 24001)
    v = disk_visibility(x / (np.pi * diameter_arcsec / RAD_ARCSEC), diameter_arcsec, ld_n)
    k = int(np.argmax(v < fraction))        # the main lobe falls monotonically to its null
    return float(x[k] / (np.pi * diameter_arcsec / RAD_ARCSEC))


# ------------------------------------------------------------------ ephemeris

@dataclass
class Ephemeris:
    """A body's ephemeris as CASA stores it with a field (FIELD/EPHEM<id>_<name>...tab):
    columns MJD (d), RA, DEC (deg), Rho (geocentric distance, AU) and, when present,
    DiskLat (sub-observer latitude, deg); keyword radii (km) and NAME."""
    name: str
    mjd: np.ndarray
    ra_deg: np.ndarray
    dec_deg: np.ndarray
    rho_au: np.ndarray
    disk_lat_deg: np.ndarray | None = None
    radii_km: tuple | None = None
    path: str = ""

    def at(self, mjd: float) -> dict:
        """Distance, sub-observer latitude and position at a time (linear in time);
        a time outside the table is an error (CASA's setjy refuses it too)."""
        if not self.mjd[0] - 1e-6 <= mjd <= self.mjd[-1] + 1e-6:
            raise ValueError(f"ephemeris {os.path.basename(self.path) or self.name}: MJD {mjd:.4f} is outside "
                             f"its range {self.mjd[0]:.4f}-{self.mjd[-1]:.4f}")
        interp = lambda y: float(np.interp(mjd, self.mjd, y))   # noqa: E731
        lat = interp(self.disk_lat_deg) if self.disk_lat_deg is not None else 0.0
        return {"distance_au": interp(self.rho_au), "ra_deg": interp(self.ra_deg), "dec_deg": interp(self.dec_deg),
                "sub_obs_lat_deg": 0.0 if lat == -999.0 else lat}


def read_ephemeris(path: str) -> Ephemeris:
    """Read a CASA ephemeris table (the format of CASA's data/ephemerides/JPL-Horizons
    and of the tables importasdm attaches to the FIELD table)."""
    import casacore.tables as ct
    with ct.table(path, ack=False) as t:
        cols = t.colnames()
        missing = [c for c in ("MJD", "RA", "DEC", "Rho") if c not in cols]
        if missing:
            raise ValueError(f"ephemeris table {path}: no column(s) {', '.join(missing)} (has {', '.join(cols)})")
        kw = t.getkeywords()
        radii = kw.get("radii")
        if isinstance(radii, dict):
            radii = radii.get("value")
        order = np.argsort(t.getcol("MJD"))
        get = lambda c: np.asarray(t.getcol(c), float)[order]   # noqa: E731
        return Ephemeris(name=str(kw.get("NAME", os.path.basename(path))), mjd=get("MJD"), ra_deg=get("RA"),
                         dec_deg=get("DEC"), rho_au=get("Rho"),
                         disk_lat_deg=get("DiskLat") if "DiskLat" in cols else None,
                         radii_km=tuple(float(r) for r in radii) if radii is not None and len(radii) == 3 else None,
                         path=path)


def field_ephemeris(ms: str, field_id: int) -> Ephemeris | None:
    """The ephemeris table attached to a field of an MS, or None: the FIELD column
    EPHEMERIS_ID names it (>= 0), the table is FIELD/EPHEM<id>_*.tab."""
    import casacore.tables as ct
    with ct.table(os.path.join(ms, "FIELD"), ack=False) as t:
        if "EPHEMERIS_ID" not in t.colnames() or field_id >= t.nrows():
            return None
        eid = int(t.getcell("EPHEMERIS_ID", field_id))
    if eid < 0:
        return None
    found = sorted(glob.glob(os.path.join(ms, "FIELD", f"EPHEM{eid}_*.tab")))
    if not found:
        raise ValueError(f"field {field_id} has EPHEMERIS_ID {eid} but {ms}/FIELD has no EPHEM{eid}_*.tab")
    return read_ephemeris(found[0])


def astropy_distance_au(body: str, mjd: float) -> float:
    """Geocentric distance (AU) of a planet from astropy's built-in ephemeris (works
    offline). Moons and asteroids are not in it: their distance needs the
    ephemeris table of the field, and asking for one here is an error saying so."""
    if BODIES[body]["kind"] != "planet":
        raise ValueError(f"{body.capitalize()} ({BODIES[body]['kind']}): no ephemeris table is attached to its "
                         f"field and astropy has no ephemeris for it; an ephemeris table (FIELD/EPHEM<id>_*.tab, "
                         f"as importasdm writes it) is needed for its distance")
    from astropy.coordinates import get_body
    from astropy.time import Time
    return float(get_body(body, Time(mjd, format="mjd", scale="utc")).distance.to_value("AU"))


# ------------------------------------------------------------------ the model

@dataclass
class DiskModel:
    """A resolved flux calibrator: callable(freq_hz) -> total flux (Jy), as a point
    model is, and visibility(freq_hz, q_lambda) -> model visibilities (Jy), zero
    beyond uv_max_lambda (those baselines are left out of the solves). mjd: the time
    of the observation, needed for Mars only."""
    body: str
    diameter_arcsec: float
    ld_n: float = 0.0
    min_fraction: float = MIN_VIS_FRACTION
    mjd: float | None = None        # of the observation (UTC): Mars's Tb varies with time

    def tb_k(self, freq_hz) -> np.ndarray:
        return brightness_temperature(self.body, freq_hz, self.mjd)

    def __call__(self, freq_hz) -> np.ndarray:
        f = np.asarray(freq_hz, float)
        return disk_flux(self.tb_k(f), f, self.diameter_arcsec)

    @property
    def uv_max_lambda(self) -> float:
        return uv_limit(self.diameter_arcsec, self.ld_n, self.min_fraction)

    def visibility(self, freq_hz, q_lambda) -> np.ndarray:
        """(nrow, nchan) model visibilities for q_lambda (nrow, nchan) at freq_hz (nchan,)."""
        q = np.asarray(q_lambda, float)
        v = self(freq_hz)[None, :] * disk_visibility(q, self.diameter_arcsec, self.ld_n)
        return np.where(q <= self.uv_max_lambda, v, 0.0)


def body_geometry(body: str, mjd: float, ephemeris: Ephemeris | None = None) -> dict:
    """Distance, mean radius and angular diameter of a body at a time: from its
    ephemeris table when there is one, else (planets) from astropy."""
    radii = BODIES[body]["radii_km"]
    if ephemeris is not None:
        at = ephemeris.at(mjd)
        radii = ephemeris.radii_km or radii
        source = f"ephemeris table {os.path.basename(ephemeris.path)}"
    else:
        at = {"distance_au": astropy_distance_au(body, mjd), "sub_obs_lat_deg": 0.0}
        source = "astropy built-in ephemeris"
    r = mean_radius_km(radii, at["sub_obs_lat_deg"])
    return {"distance_au": at["distance_au"], "sub_obs_lat_deg": at["sub_obs_lat_deg"], "radius_km": r,
            "diameter_arcsec": angular_diameter_arcsec(r, at["distance_au"]), "ephemeris": source}
