"""The calibration record of a products package (decision 11): what exportdata adds to
calibration/ and script/ so that the calibrated data can be rebuilt from the raw EB
without rerunning any heuristic, by `almapipe restore` or by CASA.

Per EB: <ms>.callibrary.json (the library as applycal applied it, field rules resolved
to field ids per spw), <ms>.flags.npz (the final flags of every science spw),
<ms>.calapply.txt (the same as CASA applycal calls); script/casa_restore.py does with
CASA what `almapipe restore` does.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .base import StageIO
from ..heuristics.callibrary import field_map
from ..calibration import restore
from ..calibration.caltable import read_caltable


def applied_calwt(ctx: dict) -> bool:
    """The applycal stage's calwt parameter, as it ran."""
    for r in ctx.get("stage_results", []):
        if r.get("name") == "applycal":
            return bool((r.get("params") or {}).get("calwt", True))
    return True


def callibrary_record(ctx: dict, io: StageIO) -> dict:
    """The library as applycal applied it (see calibration.apply_for): for every table and
    science spw, the solution fields each data field used."""
    spws = [int(p["spw"]) for p in ctx["partitions"]]
    calwt = applied_calwt(ctx)
    tables = []
    for e in ctx["callibrary"]:
        entry = ctx["caltables"][e["table"]]
        sols = {s.spw: s for s in read_caltable(io.fetch_dir(entry["key"]))}
        maps = {s: field_map(ctx, e["gainfield"], set(np.unique(sols[s].field_id).tolist()),
                             tuple(e.get("skip_fields", ()))) if s in sols else {}
                for s in spws}
        tables.append(restore.library_entry(e, entry["name"], e.get("calwt", True) and calwt, maps))
    ms = ctx.get("ms_name", "ms")
    return {"format": restore.CALLIBRARY_FORMAT, "ms_name": ms, "run_id": ctx.get("run_id"),
            "science_spws": spws, "fields": {str(f["id"]): f["name"] for f in ctx["fields"]},
            "tables": tables, "flags": f"{ms}.flags.npz"}


def calibration_package(ctx: dict, io: StageIO) -> dict:
    """Write the calibration record of the run; returns package path -> object key
    (nothing when the data were not calibrated, e.g. a run that failed early)."""
    if not ctx.get("callibrary") or not ctx.get("partitions") or \
            not all(p.get("calibrated") for p in ctx["partitions"]):
        io.log("no calibrated data: no calibration record (calapply, flags) in the package")
        return {}
    lib = callibrary_record(ctx, io)
    ms = lib["ms_name"]
    arrays = {}
    for part in ctx["partitions"]:
        vis = io.vis(part).read(data=False)        # the flags: FLAG and the row index, no visibilities
        arrays.update(restore.flag_arrays(vis))
    path = os.path.join(io.workdir, lib["flags"])
    restore.write_flags(path, arrays)
    pkg = {f"calibration/{lib['flags']}": io.put_file(path, lib["flags"])["key"],
           f"calibration/{ms}.callibrary.json": io.put_bytes(json.dumps(lib, indent=1).encode(),
                                                              f"{ms}.callibrary.json", "application/json")["key"],
           f"calibration/{ms}.calapply.txt": io.put_bytes(restore.calapply_text(lib).encode(),
                                                          f"{ms}.calapply.txt", "text/plain")["key"],
           "script/casa_restore.py": io.put_bytes(CASA_SCRIPT.encode(), "casa_restore.py", "text/x-python")["key"]}
    io.log("calibration record of %s: %d tables, flags of spws %s, %d applycal calls",
           ms, len(lib["tables"]), ",".join(map(str, lib["science_spws"])),
           restore.calapply_text(lib).count("applycal("))
    return pkg


CASA_SCRIPT = '''"""Rebuild the calibrated MS of this package with CASA 6 (casatasks), as
`almapipe restore PACKAGE EB.ms --out OUT` does without CASA.

    python casa_restore.py PACKAGE EB.ms OUT      (a Python with casatasks/casatools)
    casa -c casa_restore.py PACKAGE EB.ms OUT

1. copies EB.ms to OUT/ and untars the package's caltables there;
2. sets the FLAG column of the science spws to the run's final flags
   (calibration/<ms>.flags.npz: per spw the FLAG cube, bit-packed, with the
   TIME/ANTENNA1/ANTENNA2 of every row, rows sorted by time and antennas);
3. runs the applycal calls of calibration/<ms>.calapply.txt on the copy.
"""
import glob
import os
import shutil
import sys
import tarfile

import numpy as np
from casatasks import applycal
from casatools import table


def main(package, eb, out):
    package, eb, out = (os.path.abspath(p) for p in (package, eb, out))   # the script changes directory
    cal = os.path.join(package, "calibration")
    stem = os.path.basename(os.path.normpath(eb))[:-3] if eb.rstrip("/").endswith(".ms") else \\
        os.path.basename(os.path.normpath(eb))
    libs = sorted(glob.glob(os.path.join(cal, "*.calapply.txt")))
    mine = [p for p in libs if os.path.basename(p) == stem + ".calapply.txt"] or (libs if len(libs) == 1 else [])
    if not mine:
        sys.exit("no calapply.txt for %s in %s (there are: %s)" % (stem, cal, libs))
    ms_name = os.path.basename(mine[0])[:-len(".calapply.txt")]
    os.makedirs(out, exist_ok=True)
    vis = os.path.join(os.path.abspath(out), os.path.basename(os.path.normpath(eb)))
    if os.path.exists(vis):
        shutil.rmtree(vis)
    shutil.copytree(eb, vis)
    for tar in glob.glob(os.path.join(cal, ms_name + ".*.tbl.tar")):
        with tarfile.open(tar) as t:
            t.extractall(out)
    # the final flags, spw by spw, in the row order they were recorded in
    z = np.load(os.path.join(cal, ms_name + ".flags.npz"))
    tb = table()
    tb.open(os.path.join(vis, "DATA_DESCRIPTION"))
    spw_of_dd = tb.getcol("SPECTRAL_WINDOW_ID")
    tb.close()
    tb.open(vis, nomodify=False)
    for s in z["spws"]:
        dds = [int(d) for d in np.flatnonzero(spw_of_dd == s)]
        q = tb.query("DATA_DESC_ID IN %s" % dds, sortlist="TIME,ANTENNA1,ANTENNA2")
        shape = tuple(z["spw%d_shape" % s])
        if not (np.array_equal(q.getcol("TIME"), z["spw%d_time" % s]) and
                np.array_equal(q.getcol("ANTENNA1"), z["spw%d_ant1" % s]) and
                np.array_equal(q.getcol("ANTENNA2"), z["spw%d_ant2" % s])):
            sys.exit("spw %d of %s is not the data this package was made from" % (s, eb))
        flag = np.unpackbits(z["spw%d_flag" % s], count=int(np.prod(shape))).astype(bool).reshape(shape)
        q.putcol("FLAG", np.transpose(flag, (2, 1, 0)))      # casatools: (ncorr, nchan, nrow)
        q.close()
    tb.close()
    here = os.getcwd()
    os.chdir(out)                                            # gaintable names are relative
    try:
        text = open(mine[0]).read()
        exec(text, {"applycal": lambda **kw: applycal(**dict(kw, vis=vis))})
    finally:
        os.chdir(here)
    print("calibrated", vis)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.endswith("casa_restore.py")][-3:]
    if len(args) != 3:
        sys.exit("usage: casa_restore.py PACKAGE EB.ms OUT")
    main(*args)
'''
