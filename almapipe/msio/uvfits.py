"""UVFITS (random groups, AIPS tables) to MeasurementSet conversion.

Reads the AIPS AN (antennas), SU (sources) and FQ (frequencies) tables and the
random-group visibilities, and writes a CASA-compatible MS. Scans are not
recorded in UVFITS: a new scan starts when the source changes or when the
time gap exceeds a few integrations, as CASA's importuvfits does.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile

import numpy as np
from astropy.io import fits

from .. import limits
from .ms import C_LIGHT, CORR_CODES, FREQ_FRAMES, MSError, fill_table, new_ms, write_source_table

# AIPS Stokes codes in the STOKES axis of a UVFITS file.
AIPS_STOKES = {1: "I", 2: "Q", 3: "U", 4: "V", -1: "RR", -2: "LL", -3: "RL", -4: "LR",
               -5: "XX", -6: "YY", -7: "XY", -8: "YX"}
SCAN_GAP_INTEGRATIONS = 3.0


def is_uvfits(path: str) -> bool:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(2880)
    except OSError:
        return False
    return head.startswith(b"SIMPLE  =") and b"GROUPS  =                    T" in head


def uvfits_to_ms(uvfits_path: str, ms_path: str) -> dict:
    """Convert a UVFITS file (optionally gzipped) into an MS; returns a short summary."""
    if not is_uvfits(uvfits_path):
        raise MSError(f"{uvfits_path}: not a UVFITS file (no random-groups primary header)")
    tmp = None
    if uvfits_path.endswith(".gz"):
        # next to the MS (the worker's workdir), not in /tmp, and bounded: a gzip bomb
        # stops with limits.UnpackLimit naming the limit
        tmp = tempfile.NamedTemporaryFile(suffix=".uvfits", delete=False,
                                          dir=os.path.dirname(os.path.abspath(ms_path)))
        try:
            with gzip.open(uvfits_path, "rb") as src:
                limits.copy_bounded(src, tmp, os.path.getsize(uvfits_path), os.path.basename(uvfits_path))
        except limits.UnpackLimit:
            tmp.close()
            os.unlink(tmp.name)
            raise
        tmp.close()
        uvfits_path = tmp.name
    try:
        with fits.open(uvfits_path, memmap=True) as hdul:
            return _convert(hdul, ms_path)
    except (OSError, KeyError, IndexError, TypeError) as exc:
        raise MSError(f"{uvfits_path}: malformed UVFITS ({exc})") from exc
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


def _axis(header, name):
    for i in range(2, header["NAXIS"] + 1):
        if header.get(f"CTYPE{i}", "").strip() == name:
            return i
    raise MSError(f"UVFITS has no {name} axis")


def _convert(hdul, ms_path: str) -> dict:
    prim = hdul[0]
    h = prim.header
    gd = prim.data
    names = [n.upper() for n in gd.parnames]
    tables = {hdu.header.get("EXTNAME", "").strip(): hdu for hdu in hdul[1:]}
    if "AIPS AN" not in tables:
        raise MSError("UVFITS has no AIPS AN (antenna) table")

    # Frequency axis.
    fa = _axis(h, "FREQ")
    nchan = h[f"NAXIS{fa}"]
    freq = h[f"CRVAL{fa}"] + (np.arange(nchan) + 1 - h[f"CRPIX{fa}"]) * h[f"CDELT{fa}"]
    if "AIPS FQ" in tables:
        freq = freq + float(np.atleast_1d(tables["AIPS FQ"].data["IF FREQ"][0])[0])
    chan_width = float(h[f"CDELT{fa}"])
    sa = _axis(h, "STOKES")
    nstokes = h[f"NAXIS{sa}"]
    stokes = [AIPS_STOKES[int(round(h[f"CRVAL{sa}"] + (i + 1 - h[f"CRPIX{sa}"]) * h[f"CDELT{sa}"]))]
              for i in range(nstokes)]
    frame = (h.get("SPECSYS") or h.get("VELREF_FRAME") or "TOPO").strip().upper()
    frame = frame if frame in FREQ_FRAMES else "TOPO"

    # Visibilities: (ngroup, ..., nchan, nstokes, 3) -> (nrow, nchan, ncorr)
    raw = np.asarray(gd.data).reshape(len(gd), -1, nchan, nstokes, 3)[:, 0]
    # u, v, w and the visibilities pass through unchanged, as CASA's importuvfits
    # does (checked: identical UVW and DATA on NGC 5921), so gains and images
    # agree with CASA's in sign and orientation.
    data = (raw[..., 0] + 1j * raw[..., 1]).astype(np.complex64)
    wspec = raw[..., 2].astype(np.float32)
    flag = wspec <= 0
    weight = np.where(flag, 0, wspec).max(axis=1)   # per row and correlation

    date = gd.par("DATE")  # astropy sums the two DATE parameters (day + fraction)
    if "_DATE" in names:
        date = date + gd.par("_DATE")
    time = (np.asarray(date, float) - 2400000.5) * 86400.0
    inttim = np.asarray(gd.par("INTTIM"), float) if "INTTIM" in names else np.full(len(gd), 10.0)
    bl = np.asarray(gd.par("BASELINE"), float).round().astype(int)
    ant1 = bl // 256 - 1
    ant2 = bl % 256 - 1
    # UVFITS stores u,v,w in light seconds; the MS wants metres.
    uvw = np.stack([gd.par("UU"), gd.par("VV"), gd.par("WW")], axis=1).astype(float) * C_LIGHT
    src = np.asarray(gd.par("SOURCE"), float).round().astype(int) if "SOURCE" in names else np.ones(len(gd), int)

    # Sources -> FIELD
    if "AIPS SU" in tables:
        su = tables["AIPS SU"].data
        su_ids = list(su["ID. NO."])
        field_names = [str(s).strip() for s in su["SOURCE"]]
        ra = np.deg2rad(np.mod(su["RAEPO"], 360.0))
        dec = np.deg2rad(su["DECEPO"])
        calcodes = [str(c).strip() for c in su["CALCODE"]]
        rest = [float(x) for x in np.ravel(su["RESTFREQ"])[:len(su_ids)]] if "RESTFREQ" in su.names else []
    else:
        su_ids = [1]
        field_names = [h.get("OBJECT", "UNKNOWN").strip()]
        ra = np.deg2rad([h.get("OBSRA", 0.0)])
        dec = np.deg2rad([h.get("OBSDEC", 0.0)])
        calcodes = [""]
        rest = []
    field_of_src = {sid: i for i, sid in enumerate(su_ids)}
    field_id = np.array([field_of_src.get(s, 0) for s in src])

    order = np.lexsort((ant2, ant1, time))
    time, ant1, ant2, uvw, data, flag, weight, field_id, inttim = (
        a[order] for a in (time, ant1, ant2, uvw, data, flag, weight, field_id, inttim))
    scan = _scan_numbers(time, field_id, inttim)

    an = tables["AIPS AN"].data
    an_names = [str(n).strip() for n in an["ANNAME"]]
    nosta = list(an["NOSTA"])
    nant = max(max(nosta), int(max(ant1.max(), ant2.max())) + 1)
    pos = np.zeros((nant, 3))
    ant_names = [f"A{i + 1:02d}" for i in range(nant)]
    stations = list(ant_names)
    diam = np.full(nant, float(np.median(an["DIAMETER"])) if "DIAMETER" in an.names else 25.0)
    arr = tables["AIPS AN"].header
    offset = np.array([arr.get("ARRAYX", 0.0), arr.get("ARRAYY", 0.0), arr.get("ARRAYZ", 0.0)])
    telescope = (h.get("TELESCOP") or arr.get("ARRNAM") or "UNKNOWN").strip()
    for i, ns in enumerate(nosta):
        k = int(ns) - 1
        pos[k] = np.asarray(an["STABXYZ"][i], float) + offset
        full = an_names[i]
        stations[k] = full.split(":")[-1] if ":" in full else full
        ant_names[k] = f"{telescope[:2]}{k + 1:02d}" if telescope.upper() == "VLA" else full
        if "DIAMETER" in an.names and an["DIAMETER"][i] > 0:
            diam[k] = float(an["DIAMETER"][i])

    ncorr = len(stokes)
    if os.path.exists(ms_path):
        shutil.rmtree(ms_path)
    new_ms(ms_path, nchan, ncorr)
    import casacore.tables as ct
    nrow = len(time)
    with ct.table(ms_path, readonly=False, ack=False) as t:
        t.addrows(nrow)
        cols = {"TIME": time, "TIME_CENTROID": time, "INTERVAL": inttim, "EXPOSURE": inttim,
                "ANTENNA1": ant1, "ANTENNA2": ant2, "FIELD_ID": field_id, "SCAN_NUMBER": scan,
                "UVW": uvw, "DATA": data, "FLAG": flag, "WEIGHT": weight,
                "SIGMA": np.where(weight > 0, 1 / np.sqrt(np.maximum(weight, 1e-30)), 0).astype(np.float32),
                "DATA_DESC_ID": np.zeros(nrow, int), "ARRAY_ID": np.zeros(nrow, int),
                "OBSERVATION_ID": np.zeros(nrow, int), "PROCESSOR_ID": np.zeros(nrow, int),
                "STATE_ID": np.full(nrow, -1), "FEED1": np.zeros(nrow, int), "FEED2": np.zeros(nrow, int),
                "FLAG_ROW": flag.all(axis=(1, 2))}
        for name, values in cols.items():
            t.putcol(name, values)
    t0 = float(time.min())
    fill_table(f"{ms_path}/ANTENNA", {
        "NAME": ant_names, "STATION": stations, "POSITION": pos, "OFFSET": np.zeros((nant, 3)),
        "DISH_DIAMETER": diam, "TYPE": ["GROUND-BASED"] * nant, "MOUNT": ["ALT-AZ"] * nant,
        "FLAG_ROW": np.zeros(nant, bool)})
    nf = len(field_names)
    dirs = np.stack([ra, dec], axis=1)[:, None, :]
    fill_table(f"{ms_path}/FIELD", {
        "NAME": field_names, "CODE": [c or "NONE" for c in calcodes], "TIME": np.full(nf, t0),
        "NUM_POLY": np.zeros(nf, int), "PHASE_DIR": dirs, "DELAY_DIR": dirs, "REFERENCE_DIR": dirs,
        "SOURCE_ID": np.arange(nf), "FLAG_ROW": np.zeros(nf, bool)})
    if any(f > 0 for f in rest):    # the sources' lines (AIPS SU RESTFREQ): the images' RESTFRQ
        write_source_table(ms_path, field_names, rest, t0)
    fill_table(f"{ms_path}/SPECTRAL_WINDOW", {
        "NAME": ["spw0"], "NUM_CHAN": [nchan], "CHAN_FREQ": freq[None, :],
        "CHAN_WIDTH": np.full((1, nchan), chan_width), "EFFECTIVE_BW": np.full((1, nchan), abs(chan_width)),
        "RESOLUTION": np.full((1, nchan), abs(chan_width)), "REF_FREQUENCY": [float(freq[nchan // 2])],
        "TOTAL_BANDWIDTH": [abs(chan_width) * nchan], "MEAS_FREQ_REF": [FREQ_FRAMES[frame]],
        "NET_SIDEBAND": [1 if chan_width > 0 else -1], "FREQ_GROUP": [0], "FREQ_GROUP_NAME": ["none"],
        "IF_CONV_CHAIN": [0], "FLAG_ROW": [False]})
    fill_table(f"{ms_path}/POLARIZATION", {
        "NUM_CORR": [ncorr], "CORR_TYPE": np.array([[CORR_CODES[s] for s in stokes]]),
        "CORR_PRODUCT": np.array([[_corr_product(s) for s in stokes]]), "FLAG_ROW": [False]})
    fill_table(f"{ms_path}/DATA_DESCRIPTION", {
        "SPECTRAL_WINDOW_ID": [0], "POLARIZATION_ID": [0], "FLAG_ROW": [False]})
    fill_table(f"{ms_path}/OBSERVATION", {
        "TELESCOPE_NAME": [telescope], "OBSERVER": [str(h.get("OBSERVER", "")).strip()],
        "PROJECT": [""], "TIME_RANGE": np.array([[time.min(), time.max()]]),
        "RELEASE_DATE": [0.0], "SCHEDULE_TYPE": [""], "FLAG_ROW": [False]})
    receptors = ["R", "L"] if stokes[0] in ("RR", "LL", "RL", "LR") else ["X", "Y"]
    fill_table(f"{ms_path}/FEED", {
        "ANTENNA_ID": np.arange(nant), "FEED_ID": np.zeros(nant, int), "SPECTRAL_WINDOW_ID": np.full(nant, -1),
        "TIME": np.full(nant, t0), "INTERVAL": np.zeros(nant), "NUM_RECEPTORS": np.full(nant, 2),
        "BEAM_ID": np.full(nant, -1), "BEAM_OFFSET": np.zeros((nant, 2, 2)),
        "POLARIZATION_TYPE": np.array([receptors] * nant), "POL_RESPONSE": np.tile(np.eye(2, dtype=complex), (nant, 1, 1)),
        "POSITION": np.zeros((nant, 3)), "RECEPTOR_ANGLE": np.zeros((nant, 2))})
    fill_table(f"{ms_path}/PROCESSOR", {"TYPE": ["CORRELATOR"], "SUB_TYPE": [""], "TYPE_ID": [0],
                                        "MODE_ID": [0], "FLAG_ROW": [False]})
    return {"nrow": nrow, "nchan": nchan, "corr": stokes, "fields": field_names, "nant": nant,
            "scans": int(scan.max()), "telescope": telescope}


def _corr_product(s: str) -> list:
    if len(s) == 2:
        idx = {"R": 0, "L": 1, "X": 0, "Y": 1}
        return [idx[s[0]], idx[s[1]]]
    return [0, 0]


def _scan_numbers(time, field_id, inttim) -> np.ndarray:
    """Scan number per (time-sorted) row: new scan on a source change or a time gap."""
    ut, first = np.unique(time, return_index=True)
    f = field_id[first]
    gap = np.diff(ut) > SCAN_GAP_INTEGRATIONS * np.maximum(inttim[first][1:], 1.0)
    new = np.r_[True, (np.diff(f) != 0) | gap]
    scan_of_time = np.cumsum(new)
    return scan_of_time[np.searchsorted(ut, time)]
