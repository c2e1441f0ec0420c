"""The observation summary (CASA listobs content) and field roles (intents)."""
from __future__ import annotations

import os

import numpy as np
import casacore.tables as ct
from astropy.time import Time

from . import ms as msio
from ..calibration.fluxmodels import standard_calibrator

# ALMA/VLA STATE.OBS_MODE prefixes -> the pipeline's intent names.
INTENT_MAP = {"CALIBRATE_BANDPASS": "BANDPASS", "CALIBRATE_FLUX": "FLUX", "CALIBRATE_AMPLI": "FLUX",
              "CALIBRATE_PHASE": "PHASE", "OBSERVE_TARGET": "TARGET", "OBSERVE_CHECK_SOURCE": "CHECK",
              "CALIBRATE_ATMOSPHERE": "ATMOSPHERE", "CALIBRATE_WVR": "WVR", "CALIBRATE_POINTING": "POINTING",
              "CALIBRATE_SIDEBAND_RATIO": "SIDEBAND", "CALIBRATE_DIFFGAIN": "DIFFGAIN",
              "CALIBRATE_POL_ANGLE": "POLANGLE", "CALIBRATE_POL_LEAKAGE": "POLLEAKAGE"}


def _iso(mjd_s: float) -> str:
    return Time(mjd_s / 86400.0, format="mjd", scale="utc").isot


def summary(ms: str) -> dict:
    """Scans, fields, spws, antennas, times and baselines of an MS."""
    with ct.table(ms, ack=False) as t:
        time = t.getcol("TIME")
        scan = t.getcol("SCAN_NUMBER")
        fid = t.getcol("FIELD_ID")
        ddid = t.getcol("DATA_DESC_ID")
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        state = t.getcol("STATE_ID")
        interval = t.getcol("INTERVAL")
        uvw = t.getcol("UVW")
    modes = msio.state_intents(ms)
    spw_of = msio.spw_of_ddid(ms)
    fields = msio.field_table(ms)
    scans = []
    for s in np.unique(scan):
        r = scan == s
        st = {modes[i] for i in np.unique(state[r]) if 0 <= i < len(modes)}
        t0_, t1_ = float(time[r].min() - interval[r][0] / 2), float(time[r].max() + interval[r][0] / 2)
        scans.append({"scan": int(s), "field_id": int(fid[r][0]), "field": fields[int(fid[r][0])]["name"],
                      "start": _iso(t0_), "end": _iso(t1_), "start_mjd_s": t0_, "end_mjd_s": t1_,
                      "duration_s": float(time[r].max() - time[r].min() + interval[r][0]),
                      "nrows": int(r.sum()), "spws": sorted({spw_of[int(d)] for d in np.unique(ddid[r])}),
                      "intents": sorted(intents_of_modes(st)),
                      "integration_s": float(np.median(interval[r]))})
    ants = msio.antenna_table(ms)
    with_data = set(np.unique(np.r_[a1, a2]).tolist())
    cross = a1 != a2
    bl = np.linalg.norm(uvw[cross], axis=1) if cross.any() else np.zeros(1)
    with ct.table(f"{ms}/OBSERVATION", ack=False) as t:
        telescope = str(t.getcell("TELESCOPE_NAME", 0)) if t.nrows() else "UNKNOWN"
        observer = str(t.getcell("OBSERVER", 0)) if t.nrows() else ""
    for f in fields:
        r = fid == f["id"]
        f["nrows"] = int(r.sum())
        f["time_on_source_s"] = float(sum(sc["duration_s"] for sc in scans if sc["field_id"] == f["id"]))
    spws = classify_spws(msio.spw_table(ms), scans)
    science = [s["id"] for s in spws if s["kind"] == "science"]
    frame, rest = _directions_and_lines(ms, fields)
    return {"telescope": telescope, "observer": observer, "start": _iso(time.min()), "end": _iso(time.max()),
            "start_mjd_s": float(time.min()), "direction_frame": frame,
            "duration_s": float(time.max() - time.min()), "nrows": int(len(time)),
            "scans": scans, "fields": fields, "spws": spws, "science_spws": science,
            "antennas": [dict(a, has_data=a["id"] in with_data) for a in ants],
            "baselines_m": {"min": float(bl.min()), "max": float(bl.max()), "median": float(np.median(bl))},
            "corr_types": msio.corr_types_of_spw(ms, science[0] if science else 0)}


def _directions_and_lines(ms: str, fields: list) -> tuple:
    """The frame of the fields' directions (the MEASINFO reference of FIELD.PHASE_DIR:
    'J2000' for the VLA, 'ICRS' in ALMA's EBs) and, on each field, the rest frequency
    of its source's first line (SOURCE.REST_FREQUENCY; None when the MS has none)."""
    with ct.table(f"{ms}/FIELD", ack=False) as t:
        ref = t.getcolkeywords("PHASE_DIR").get("MEASINFO", {}).get("Ref", "J2000")
        source_ids = t.getcol("SOURCE_ID") if "SOURCE_ID" in t.colnames() else np.arange(t.nrows())
    rest = {}
    if os.path.isdir(f"{ms}/SOURCE"):
        with ct.table(f"{ms}/SOURCE", ack=False) as t:
            if "REST_FREQUENCY" in t.colnames():
                for i in range(t.nrows()):
                    if t.iscelldefined("REST_FREQUENCY", i):
                        lines = np.ravel(t.getcell("REST_FREQUENCY", i))
                        if len(lines) and lines[0] > 0:
                            rest.setdefault(int(t.getcell("SOURCE_ID", i)), float(lines[0]))
    for f, sid in zip(fields, source_ids):
        f["rest_freq_hz"] = rest.get(int(sid))
    return str(ref), rest


# Intents of scans that calibrate the instrument without science data in their spws
# (Tsys, WVR, pointing, sideband ratio): a spw seen only in these is not a science spw.
INSTRUMENT_INTENTS = {"ATMOSPHERE", "WVR", "POINTING", "SIDEBAND"}


def classify_spws(spws: list, scans: list) -> list:
    """Each spw's kind, as the ALMA pipeline tells them apart:

    * ``wvr``: the water-vapour radiometers' spw (named WVR, or 4 channels near 183 GHz);
    * ``chavg``: channel averages and square-law detector totals of another spw
      (ALMA names them ``...#CH_AVG`` and ``...#SQLD``);
    * ``tsys``: spws observed only in ATMOSPHERE (and other instrument) scans: the
      TDM spws whose spectra are the SYSCAL table's;
    * ``science``: the rest that have data; ``nodata``: no rows at all.
    Also records each spw's scan intents and sideband (by the sign of the channel width).
    """
    intents = {s["id"]: set() for s in spws}
    observed = set()
    for sc in scans:
        for sid in sc["spws"]:
            observed.add(sid)
            intents.setdefault(sid, set()).update(sc["intents"])
    out = []
    for s in spws:
        name = s["name"].upper()
        f = np.asarray(s["chan_freq_hz"], float)
        mine = intents.get(s["id"], set())
        if "WVR" in name or (s["nchan"] == 4 and 170e9 < f.mean() < 200e9):
            kind = "wvr"
        elif "CH_AVG" in name or "SQLD" in name:
            kind = "chavg"
        elif s["id"] not in observed:
            kind = "nodata"
        elif mine and mine <= INSTRUMENT_INTENTS:
            kind = "tsys" if "ATMOSPHERE" in mine else "instrument"
        else:
            kind = "science"
        out.append(dict(s, kind=kind, intents=sorted(mine),
                        sideband="LSB" if s["chan_width_hz"] < 0 else "USB"))
    return out


def intents_of_modes(modes) -> set:
    out = set()
    for m in modes:
        for part in str(m).split(","):
            key = part.split("#")[0].strip()
            if key in INTENT_MAP:
                out.add(INTENT_MAP[key])
    return out


def assign_roles(obs: dict, field_roles: dict | None) -> list:
    """Intents per field: from the STATE table, else the recipe's field_roles,
    else a heuristic: standard flux calibrators are BANDPASS+FLUX, the field with
    the most time is TARGET, fields observed next to target scans are PHASE."""
    fields = [{"id": f["id"], "name": f["name"], "intents": []} for f in obs["fields"]]
    by_name = {f["name"]: f for f in fields}
    for sc in obs["scans"]:
        f = fields[sc["field_id"]]
        f["intents"] = sorted(set(f["intents"]) | set(sc["intents"]))
    source = "STATE table"
    if field_roles:
        source = "recipe parameter field_roles"
        for name, roles in field_roles.items():
            if name not in by_name:
                raise ValueError(f"field_roles names field {name!r}, which is not in the data "
                                 f"(fields: {', '.join(by_name)})")
            roles = roles.split(",") if isinstance(roles, str) else roles
            by_name[name]["intents"] = sorted({r.strip().upper() for r in roles})
    elif not any(f["intents"] for f in fields):
        source = "heuristic (standard calibrator names and the scan pattern)"
        observed = {sc["field_id"] for sc in obs["scans"]}
        for f in fields:
            if f["id"] in observed and standard_calibrator(f["name"]):
                f["intents"] = ["BANDPASS", "FLUX"]
        rest = [f for f in fields if not f["intents"] and f["id"] in observed]
        if rest:
            t_on = {f["id"]: sum(sc["duration_s"] for sc in obs["scans"] if sc["field_id"] == f["id"]) for f in rest}
            target = max(rest, key=lambda f: t_on[f["id"]])
            target["intents"] = ["TARGET"]
            order = [sc["field_id"] for sc in obs["scans"]]
            neighbours = {order[i + d] for i, fid in enumerate(order) if fid == target["id"]
                          for d in (-1, 1) if 0 <= i + d < len(order)}
            for f in rest:
                if f is not target:
                    f["intents"] = ["PHASE"] if f["id"] in neighbours else ["TARGET"]
    for f in fields:
        f["std_name"] = standard_calibrator(f["name"])
        f["roles_from"] = source
    return fields
