"""Rebuilding the calibrated data of an EB from a products package (decision 11).

The package's calibration/ holds, per EB (MS name ``<ms>``):

* ``<ms>.<table>.tbl.tar``   the CASA caltables;
* ``<ms>.callibrary.json``   how they were applied: per science spw, the tables in
  order, each with its time interpolation, calwt and the solution fields each
  data field used (the library's field rules resolved to field ids);
* ``<ms>.flags.npz``          the final flags of every science spw (see write_flags);
* ``<ms>.calapply.txt``       the same application as CASA applycal calls.

restore_ms() applies exactly what applycal applied, with the same kernels, so the
CORRECTED_DATA it writes equals the pipeline's to float precision; no heuristic runs.
This module has no stage or service dependency: `almapipe restore` uses it offline.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np

from .applycal import GainApply, apply_tables
from .caltable import read_caltable
from ..msio import ms as msio

CALLIBRARY_FORMAT = "almapipe-callibrary-1"
FLAGS_FORMAT = "almapipe-flags-1"

# CASA's interp is 'time,freq'. Tables with one channel take the time part only;
# per-channel tables (bandpass, Tsys mapped onto the science channels, WVR and
# antenna-position phases) have a solution at every data channel, so 'nearestflag'
# in frequency takes that channel and flags the data where it is flagged, as ours does.
PER_CHANNEL_KINDS = ("B", "TSYS", "WVR", "ANTPOS")


class RestoreError(ValueError):
    """The package and the EB do not fit together; the message says how."""


# ------------------------------------------------------------------ flags

def flag_arrays(vis: msio.Vis) -> dict:
    """One spw's flags as the arrays of the flags file: the FLAG cube (nrow, nchan,
    ncorr), bit-packed, and the (TIME, ANTENNA1, ANTENNA2) of every row, in the
    order read_vis reads them (sorted by time, antenna1, antenna2), which is the
    same in the raw EB and in a partition of it."""
    s = vis.spw
    return {f"spw{s}_shape": np.array(vis.flag.shape, np.int64),
            f"spw{s}_flag": np.packbits(vis.flag.ravel()),
            f"spw{s}_time": vis.time.astype(np.float64), f"spw{s}_ant1": vis.ant1.astype(np.int32),
            f"spw{s}_ant2": vis.ant2.astype(np.int32)}


def write_flags(path: str, arrays: dict) -> None:
    spws = sorted({int(k.split("_")[0][3:]) for k in arrays})
    np.savez_compressed(path, format=np.array(FLAGS_FORMAT), spws=np.array(spws, np.int64), **arrays)


def read_flags(path: str) -> dict:
    """spw -> (flag cube, time, ant1, ant2)."""
    with np.load(path) as z:
        if str(z["format"]) != FLAGS_FORMAT:
            raise RestoreError(f"{path}: not an almapipe flags file (format {z['format']!r})")
        out = {}
        for s in z["spws"].tolist():
            shape = tuple(z[f"spw{s}_shape"].tolist())
            flag = np.unpackbits(z[f"spw{s}_flag"], count=int(np.prod(shape))).astype(bool).reshape(shape)
            out[s] = (flag, z[f"spw{s}_time"], z[f"spw{s}_ant1"], z[f"spw{s}_ant2"])
    return out


def rows_match(vis: msio.Vis, time: np.ndarray, ant1: np.ndarray, ant2: np.ndarray) -> str | None:
    """None when the rows are the same; else why not."""
    if len(vis.time) != len(time):
        return f"{len(vis.time)} rows in the EB, {len(time)} in the package's flags"
    bad = (vis.time != time) | (vis.ant1 != ant1) | (vis.ant2 != ant2)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        return (f"row {r} is (time {vis.time[r]:.3f}, antennas {vis.ant1[r]}-{vis.ant2[r]}) in the EB and "
                f"(time {time[r]:.3f}, antennas {ant1[r]}-{ant2[r]}) in the package")
    return None


# ------------------------------------------------------------------ the library as applied

def library_entry(e: dict, file: str, calwt: bool, field_maps: dict) -> dict:
    """One table of callibrary.json: e is the context's library entry; field_maps
    spw -> None (every field, any solutions) or {field: [solution fields]}."""
    return {"table": e["table"], "file": file, "kind": e["kind"], "interp": e["interp"], "calwt": bool(calwt),
            "gainfield_rule": e["gainfield"],
            "field_map": {str(s): (None if m is None else {str(f): [int(x) for x in v] for f, v in m.items()})
                          for s, m in field_maps.items()}}


def applies_for(lib: dict, spw: int, tables: dict) -> list:
    """GainApply list of one spw, as applycal built it; tables: file -> [CalSolutions]."""
    out = []
    for t in lib["tables"]:
        sol = next((s for s in tables[t["file"]] if s.spw == spw), None)
        if sol is None:
            raise RestoreError(f"{t['file']} has no solutions for spw {spw}")
        fm = t["field_map"].get(str(spw))
        fm = None if fm is None else {int(f): v for f, v in fm.items()}
        out.append(GainApply(sol, interp=t["interp"], calwt=t["calwt"], field_map=fm))
    return out


def casa_interp(t: dict) -> str:
    return f"{t['interp']},nearestflag" if t["kind"] in PER_CHANNEL_KINDS else t["interp"]


def calapply_text(lib: dict, vis_name: str | None = None) -> str:
    """The application as CASA applycal calls, one per group of fields and spws
    that take the same tables with the same solution fields: gainfield '' where a
    table's solutions of every field apply, else the solution fields' ids; a table
    that does not apply to a field (an empty field list) is left out of its call.
    Solutions are written per spw already, so no spwmap is needed."""
    vis = vis_name or f"{lib['ms_name']}.ms"
    groups: dict = {}
    for spw in lib["science_spws"]:
        for fid in sorted(int(f) for f in lib["fields"]):
            sig = []
            for t in lib["tables"]:
                fm = t["field_map"].get(str(spw))
                if fm is None:
                    sig.append((t["file"], "", casa_interp(t), t["calwt"]))
                    continue
                sel = fm.get(str(fid), [])
                if sel:
                    sig.append((t["file"], ",".join(map(str, sel)), casa_interp(t), t["calwt"]))
            if sig:
                groups.setdefault(tuple(sig), {}).setdefault(spw, []).append(fid)
    calls = {}
    for sig, by_spw in groups.items():
        for spw, fids in by_spw.items():
            calls.setdefault((sig, tuple(fids)), []).append(spw)
    lines = [f"# The calibration almapipe applied to {vis}, as CASA 6 applycal calls (casatasks).",
             "# Caltables are those of calibration/ (untar them beside the MS first); flags are",
             f"# in {lib['ms_name']}.flags.npz (script/casa_restore.py applies both)."]
    for (sig, fids), spws in sorted(calls.items(), key=lambda kv: (kv[0][1], kv[1])):
        names = ", ".join(lib["fields"][str(f)] for f in fids)
        lines.append(f"# {names}")
        lines.append(
            f"applycal(vis={vis!r}, field={','.join(map(str, fids))!r}, spw={','.join(map(str, spws))!r}, "
            f"intent='', gaintable={[s[0] for s in sig]!r}, gainfield={[s[1] for s in sig]!r}, "
            f"interp={[s[2] for s in sig]!r}, spwmap={[[] for _ in sig]!r}, calwt={[s[3] for s in sig]!r}, "
            f"parang=False, applymode='calflagstrict', flagbackup=False)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ restore

def find_callibrary(cal_dir: str, ms_path: str, n_ebs: int) -> str:
    """The callibrary.json of an EB: <stem>.callibrary.json, or the only one there is
    when one EB is restored from a one-EB package."""
    libs = sorted(f for f in os.listdir(cal_dir) if f.endswith(".callibrary.json")) if os.path.isdir(cal_dir) else []
    if not libs:
        raise RestoreError(f"{cal_dir}: no *.callibrary.json: not a products package of almapipe with "
                           f"a calibration record (made before restore existed?)")
    stem = os.path.basename(os.path.normpath(ms_path))
    for ext in (".tar", ".ms"):
        stem = stem[:-len(ext)] if stem.endswith(ext) else stem
    if f"{stem}.callibrary.json" in libs:
        return os.path.join(cal_dir, f"{stem}.callibrary.json")
    if len(libs) == 1 and n_ebs == 1:
        return os.path.join(cal_dir, libs[0])
    raise RestoreError(f"no calibration record for {stem} in the package; it has "
                       f"{', '.join(lib[:-len('.callibrary.json')] for lib in libs)}")


def _unpack_eb(path: str, workdir: str) -> str:
    if os.path.isdir(path):
        return path
    if tarfile.is_tarfile(path):
        dest = os.path.join(workdir, "eb-" + os.path.basename(path))
        with tarfile.open(path) as t:
            t.extractall(dest, filter="data")
        tops = [d for d in os.listdir(dest) if d.endswith(".ms") and os.path.isdir(os.path.join(dest, d))]
        if len(tops) != 1:
            raise RestoreError(f"{path}: a tar must hold one MS directory, found {tops}")
        return os.path.join(dest, tops[0])
    raise RestoreError(f"{path}: not an MS directory nor a tar of one")


def _init_corrected(ms: str) -> None:
    """CORRECTED_DATA = DATA in every row (as CASA's applycal makes it), so rows of the
    spws that are not calibrated (WVR, Tsys, channel averages) have it too."""
    import casacore.tables as ct
    with ct.table(ms, readonly=False, ack=False) as t:
        if "CORRECTED_DATA" not in t.colnames():
            desc = t.getcoldesc("DATA")
            desc["comment"] = "CORRECTED_DATA written by almapipe restore"
            t.addcols(ct.maketabdesc(ct.makecoldesc("CORRECTED_DATA", desc)))
        ct.taql("UPDATE $t SET CORRECTED_DATA = DATA")


def restore_ms(package: str, eb: str, out_dir: str, n_ebs: int = 1, log=print) -> str:
    """Write out_dir/<eb>.ms: the raw EB with the package's final flags and CORRECTED_DATA
    (and WEIGHT, with calwt) from its caltables. Returns the path written."""
    cal_dir = os.path.join(package, "calibration")
    lib_path = find_callibrary(cal_dir, eb, n_ebs)
    with open(lib_path) as f:
        lib = json.load(f)
    if lib.get("format") != CALLIBRARY_FORMAT:
        raise RestoreError(f"{lib_path}: unknown format {lib.get('format')!r}")
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, ".restore-tables")
    os.makedirs(work, exist_ok=True)
    tables = {}
    for t in lib["tables"]:
        tar = os.path.join(cal_dir, t["file"] + ".tar")
        if not os.path.exists(tar):
            raise RestoreError(f"the package lacks calibration/{t['file']}.tar, which {lib['ms_name']} was "
                               f"calibrated with")
        with tarfile.open(tar) as tf:
            tf.extractall(work, filter="data")
        tables[t["file"]] = read_caltable(os.path.join(work, t["file"]))
    flags = read_flags(os.path.join(cal_dir, lib["flags"]))
    src = _unpack_eb(eb, work)
    name = os.path.basename(os.path.normpath(src))
    dest = os.path.join(out_dir, name if name.endswith(".ms") else name + ".ms")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    _init_corrected(dest)
    for spw in lib["science_spws"]:
        try:
            vis = msio.read_vis(dest, spw)
        except msio.MSError as exc:
            raise RestoreError(f"{eb}: {exc}: not the EB {lib['ms_name']} was made from") from None
        flag, time, a1, a2 = flags[spw]
        why = rows_match(vis, time, a1, a2)
        if why:
            raise RestoreError(f"{eb}: spw {spw} is not the data {lib['ms_name']} was calibrated from: {why}")
        vis.flag = flag.copy()
        corrected, newflag, weight = apply_tables(vis, applies_for(lib, spw, tables), strict=True)
        msio.write_column(dest, vis.rows, "CORRECTED_DATA", corrected)
        msio.write_flags(dest, vis.rows, newflag)
        msio.write_column(dest, vis.rows, "WEIGHT", weight.astype(np.float32))
        log(f"{name} spw {spw}: {len(vis.rows)} rows calibrated with "
            f"{', '.join(t['table'] for t in lib['tables'])}; {newflag.mean():.1%} flagged")
    shutil.rmtree(work, ignore_errors=True)
    return dest
