"""Calibration steps on a simulated ALMA EB: almapipe's kernels against CASA's tasks.

    .venv/bin/python bench/alma_stages.py --ms EB/sim.ms [--casa-python PATH] [--repeat 1]

Each step runs as its own process on its own copy of the MS, ours and CASA's in turn,
so the figures are whole-process wall times (start-up and I/O included) and the
ratio ours/CASA compares like with like. The steps, the same on both sides:

  flagdata  autocorrelations, shadowing and 8 edge channels per spw flagged
            (CASA: flagdata mode='list')
  tsyscal   Tsys spectra from SYSCAL mapped to the science spws (CASA: gencal 'tsys')
  antpos    phase corrections for the antennapos.csv offsets (CASA: gencal 'antpos')
  bandpass  per-integration phase-up on the bandpass calibrator, then the bandpass
            (solint inf, combine scan, solnorm)
  gaincal   per-integration phases and per-scan amplitude+phase gains on all
            calibrators, bandpass applied (gfluxscale's and timegaincal's solves)
  fluxscale flux of the phase and check calibrators from the gains (CASA: fluxscale)
  applycal  Tsys, positions, bandpass and gains applied to every field, CORRECTED_DATA
            written

wvrgcal is not compared here (CASA's wvrgcal wants more of an ASDM-derived MS than the
WVR spw the simulator writes). Both sides work on the science spws only (the EB also has
the WVR spw, Tsys spws and channel averages, as importasdm writes them).

CASA runs only where --casa-python names an interpreter with casatasks (it is never a
dependency of almapipe). Make the EB with `almapipe simulate --preset realistic`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STEPS = ("flagdata", "tsyscal", "antpos", "bandpass", "gaincal", "fluxscale", "applycal")
EDGE = 8
BP_FIELD, CAL_FIELDS, REFANT = 0, [0, 1, 2], 1


def ours(step: str, ms: str, work: str) -> None:
    import numpy as np
    from almapipe.calibration.applycal import GainApply, apply_tables
    from almapipe.calibration.caltable import read_caltable, write_caltable
    from almapipe.calibration.terms import SolveSpec, point_model, solve_term
    from almapipe.msio.ms import read_vis, spw_table, write_column, write_flags
    from almapipe.stages.alma import delay_table, parse_antennapos, sample_times, source_vectors, tsys_solutions
    from almapipe.stages.calibration import derive_flux
    from almapipe.heuristics.flagging import shadow_mask
    import casacore.tables as ct
    from almapipe.msio.listobs import summary
    obs = summary(ms)
    spws = obs["science_spws"]
    unit = lambda f: np.ones_like(f)  # noqa: E731
    for spw in spws:
        if step == "flagdata":
            vis = read_vis(ms, spw)
            with ct.table(f"{ms}/ANTENNA", ack=False) as t:
                diam = t.getcol("DISH_DIAMETER")
            rows = (vis.ant1 == vis.ant2) | shadow_mask(vis.time, vis.ant1, vis.ant2, vis.uvw, diam)
            flag = vis.flag | rows[:, None, None]
            flag[:, :EDGE] = flag[:, -EDGE:] = True
            write_flags(ms, vis.rows, flag)
        elif step == "tsyscal":
            sol, _ = tsys_solutions(ms, spw, obs["scans"])
            write_caltable(sol, f"{work}/T.spw{spw}", ms)
        elif step == "antpos":
            offsets = parse_antennapos(open(os.path.join(os.path.dirname(ms), "antennapos.csv")).read())
            with ct.table(f"{ms}/ANTENNA", ack=False) as t:
                names = list(t.getcol("NAME"))
            with ct.table(f"{ms}/FIELD", ack=False) as t:
                direction = t.getcol("PHASE_DIR")[:, 0, :]
            delta = np.zeros((len(names), 3))
            for name, d in offsets.items():
                delta[names.index(name)] = d
            if spw == spws[0]:         # the times are the same for every spw
                with ct.table(ms, ack=False) as t:
                    times, fids = sample_times(t.getcol("TIME"), t.getcol("FIELD_ID"), t.getcol("SCAN_NUMBER"),
                                               60.0)
                s = source_vectors(times, direction[fids, 0], direction[fids, 1])
            freq = np.array(spw_table(ms)[spw]["chan_freq_hz"])
            write_caltable(delay_table("ANTPOS", spw, freq, times, fids, s @ delta.T), f"{work}/A.spw{spw}", ms)
        elif step == "fluxscale":
            g = read_caltable(f"{work}/G.spw{spw}")[0]
            for fid in CAL_FIELDS[1:]:
                print(spw, fid, derive_flux(g, [BP_FIELD], fid))
        elif step == "bandpass":
            vis = read_vis(ms, spw, field_ids=[BP_FIELD])
            vis.flag |= (vis.ant1 == vis.ant2)[:, None, None]
            m = point_model(vis, {BP_FIELD: unit})
            ph = solve_term(vis, m, SolveSpec(kind="G", solint="int", calmode="p", refant=REFANT))
            b = solve_term(vis, m, SolveSpec(kind="B", combine="scan", refant=REFANT, solnorm=True,
                                             preapply=[GainApply(ph, interp="nearest", calwt=False)]))
            write_caltable(b, f"{work}/B.spw{spw}", ms)
        elif step == "gaincal":
            vis = read_vis(ms, spw, field_ids=CAL_FIELDS)
            vis.flag |= (vis.ant1 == vis.ant2)[:, None, None]
            m = point_model(vis, {f: unit for f in CAL_FIELDS})
            b = read_caltable(f"{work}/B.spw{spw}")[0]
            ph = solve_term(vis, m, SolveSpec(kind="G", solint="int", calmode="p", refant=REFANT, preapply=[b]))
            write_caltable(ph, f"{work}/P.spw{spw}", ms)
            g = solve_term(vis, m, SolveSpec(kind="G", solint="inf", refant=REFANT,
                                             preapply=[b, GainApply(ph, calwt=False)]))
            write_caltable(g, f"{work}/G.spw{spw}", ms)
        elif step == "applycal":
            vis = read_vis(ms, spw)
            t, a, b, g = (read_caltable(f"{work}/{k}.spw{spw}")[0] for k in "TABG")
            own = {int(f): [int(f)] for f in np.unique(vis.field_id)}     # antpos: each field its own
            data, flag, _ = apply_tables(vis, [GainApply(t, interp="linear"),
                                               GainApply(a, interp="linear", calwt=False, field_map=own),
                                               GainApply(b, interp="nearest"), GainApply(g, interp="linear")])
            write_column(ms, vis.rows, "CORRECTED_DATA", data)


def casa(step: str, ms: str, work: str) -> None:
    from casatasks import applycal, bandpass, flagdata, fluxscale, gaincal, gencal
    from casatools import table
    fields = ",".join(map(str, CAL_FIELDS))
    with open(os.path.join(os.path.dirname(ms), "truth.json")) as f:
        truth = json.load(f)
    science = truth["science_spws"]
    spw = ",".join(map(str, science))
    if step == "flagdata":
        tb = table()
        tb.open(f"{ms}/SPECTRAL_WINDOW")
        nchan = int(tb.getcell("NUM_CHAN", science[0]))
        tb.close()
        flagdata(vis=ms, mode="list", flagbackup=False,
                 inpfile=[f"mode='manual' spw='{spw}' autocorr=True", f"mode='shadow' spw='{spw}'",
                          f"mode='manual' spw='{spw}:0~{EDGE - 1};{nchan - EDGE}~{nchan - 1}'"])
    elif step == "tsyscal":
        gencal(vis=ms, caltable=f"{work}/casa.T", caltype="tsys")
    elif step == "antpos":
        import csv
        rows = list(csv.DictReader(open(os.path.join(os.path.dirname(ms), "antennapos.csv"))))
        gencal(vis=ms, caltable=f"{work}/casa.A", caltype="antpos", antenna=",".join(r["antenna"] for r in rows),
               parameter=[float(r[k]) for r in rows for k in ("xoffset_m", "yoffset_m", "zoffset_m")])
    elif step == "fluxscale":
        fluxscale(vis=ms, caltable=f"{work}/casa.G", fluxtable=f"{work}/casa.F", reference=str(BP_FIELD),
                  transfer=",".join(map(str, CAL_FIELDS[1:])))
    elif step == "bandpass":
        gaincal(vis=ms, caltable=f"{work}/casa.P0", field=str(BP_FIELD), spw=spw, solint="int", calmode="p",
                refant=str(REFANT))
        bandpass(vis=ms, caltable=f"{work}/casa.B", field=str(BP_FIELD), spw=spw, solint="inf", combine="scan",
                 refant=str(REFANT), solnorm=True, gaintable=[f"{work}/casa.P0"])
    elif step == "gaincal":
        gaincal(vis=ms, caltable=f"{work}/casa.P", field=fields, spw=spw, solint="int", calmode="p",
                refant=str(REFANT), gaintable=[f"{work}/casa.B"])
        gaincal(vis=ms, caltable=f"{work}/casa.G", field=fields, spw=spw, solint="inf", calmode="ap",
                refant=str(REFANT), gaintable=[f"{work}/casa.B", f"{work}/casa.P"])
    elif step == "applycal":
        # the Tsys table's solutions are in the Tsys spws: map each science spw to its own
        tsys_map = list(range(max(science) + 1))
        for tsys_spw, sci in truth["tsys_spw_map"].items():
            tsys_map[sci] = int(tsys_spw)
        applycal(vis=ms, spw=spw, gaintable=[f"{work}/casa.T", f"{work}/casa.A", f"{work}/casa.B", f"{work}/casa.G"],
                 interp=["linear", "", "nearest", "linear"], calwt=[True, False, True, True],
                 spwmap=[tsys_map, [], [], []])


def run_one(python: str, side: str, step: str, ms: str, work: str) -> float:
    """One step as its own process on a fresh copy of the MS; wall seconds."""
    copy = os.path.join(work, side, f"{step}.ms")           # beside a copy of antennapos.csv
    shutil.rmtree(copy, ignore_errors=True)
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    shutil.copytree(ms, copy)
    for side_file in ("antennapos.csv", "truth.json"):
        path = os.path.join(os.path.dirname(ms), side_file)
        if os.path.exists(path):
            shutil.copy(path, os.path.dirname(copy))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.perf_counter()
    proc = subprocess.run([python, os.path.abspath(__file__), "--child", side, "--step", step, "--ms", copy,
                           "--work", work], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          cwd=work)   # CASA writes its logs into the working directory
    if proc.returncode:
        raise SystemExit(f"{side} {step} failed:\n{proc.stderr[-3000:]}")
    dt = time.perf_counter() - t0
    shutil.rmtree(copy, ignore_errors=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", required=True)
    ap.add_argument("--casa-python", default="")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset (later steps need the "
                    "tables of earlier ones in --work)")
    ap.add_argument("--child", choices=("ours", "casa"))
    ap.add_argument("--step", choices=STEPS)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        (ours if args.child == "ours" else casa)(args.step, args.ms, args.work)
        return
    work = args.work or tempfile.mkdtemp(prefix="almabench-")
    rows = []
    for step in args.steps.split(","):
        a = [run_one(sys.executable, "ours", step, args.ms, work) for _ in range(args.repeat)]
        b = [run_one(args.casa_python, "casa", step, args.ms, work) for _ in range(args.repeat)] \
            if args.casa_python else []
        rows.append({"step": step, "almapipe_s": statistics.median(a),
                     "casa_s": statistics.median(b) if b else None})
    print(f"{'step':10s} {'almapipe (s)':>13s} {'CASA (s)':>10s} {'ratio':>7s}")
    for r in rows:
        ratio = r["almapipe_s"] / r["casa_s"] if r["casa_s"] else float("nan")
        print(f"{r['step']:10s} {r['almapipe_s']:13.1f} {r['casa_s'] or float('nan'):10.1f} {ratio:7.2f}")
    total_a = sum(r["almapipe_s"] for r in rows)
    total_b = sum(r["casa_s"] for r in rows) if all(r["casa_s"] for r in rows) else None
    if total_b:
        print(f"{'total':10s} {total_a:13.1f} {total_b:10.1f} {total_a / total_b:7.2f}")
    print(json.dumps(rows))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
