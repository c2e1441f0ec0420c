"""Calibration steps on a simulated ALMA EB: almapipe's kernels against CASA's tasks.

    .venv/bin/python bench/alma_stages.py --ms EB/sim.ms [--casa-python PATH] [--repeat 1]

Each step runs as its own process on its own copy of the MS, ours and CASA's in turn,
so the figures are whole-process wall times (start-up and I/O included) and the
ratio ours/CASA compares like with like. The steps, the same on both sides:

  bandpass  per-integration phase-up on the bandpass calibrator, then the bandpass
            (solint inf, combine scan, solnorm)
  gaincal   per-integration phases and per-scan amplitude+phase gains on all
            calibrators, bandpass applied
  applycal  bandpass and gains applied to every field, CORRECTED_DATA written

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

STEPS = ("bandpass", "gaincal", "applycal")
BP_FIELD, CAL_FIELDS, REFANT = 0, [0, 1, 2], 1


def ours(step: str, ms: str, work: str) -> None:
    import numpy as np
    from almapipe.calibration.applycal import GainApply, apply_tables
    from almapipe.calibration.caltable import read_caltable, write_caltable
    from almapipe.calibration.terms import SolveSpec, point_model, solve_term
    from almapipe.msio.ms import read_vis, spw_of_ddid, write_column
    spws = sorted(set(spw_of_ddid(ms).values()))
    unit = lambda f: np.ones_like(f)  # noqa: E731
    for spw in spws:
        if step == "bandpass":
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
            b, g = read_caltable(f"{work}/B.spw{spw}")[0], read_caltable(f"{work}/G.spw{spw}")[0]
            data, flag, _ = apply_tables(vis, [GainApply(b, interp="nearest"), GainApply(g, interp="linear")])
            write_column(ms, vis.rows, "CORRECTED_DATA", data)


def casa(step: str, ms: str, work: str) -> None:
    from casatasks import applycal, bandpass, gaincal
    fields = ",".join(map(str, CAL_FIELDS))
    if step == "bandpass":
        gaincal(vis=ms, caltable=f"{work}/casa.P0", field=str(BP_FIELD), solint="int", calmode="p",
                refant=str(REFANT))
        bandpass(vis=ms, caltable=f"{work}/casa.B", field=str(BP_FIELD), solint="inf", combine="scan",
                 refant=str(REFANT), solnorm=True, gaintable=[f"{work}/casa.P0"])
    elif step == "gaincal":
        gaincal(vis=ms, caltable=f"{work}/casa.P", field=fields, solint="int", calmode="p", refant=str(REFANT),
                gaintable=[f"{work}/casa.B"])
        gaincal(vis=ms, caltable=f"{work}/casa.G", field=fields, solint="inf", calmode="ap", refant=str(REFANT),
                gaintable=[f"{work}/casa.B", f"{work}/casa.P"])
    elif step == "applycal":
        applycal(vis=ms, gaintable=[f"{work}/casa.B", f"{work}/casa.G"], interp=["nearest", "linear"])


def run_one(python: str, side: str, step: str, ms: str, work: str) -> float:
    """One step as its own process on a fresh copy of the MS; wall seconds."""
    copy = os.path.join(work, f"{side}.{step}.ms")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ms, copy)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.perf_counter()
    subprocess.run([python, os.path.abspath(__file__), "--child", side, "--step", step, "--ms", copy,
                    "--work", work], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    shutil.rmtree(copy, ignore_errors=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", required=True)
    ap.add_argument("--casa-python", default="")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", choices=("ours", "casa"))
    ap.add_argument("--step", choices=STEPS)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child:
        (ours if args.child == "ours" else casa)(args.step, args.ms, args.work)
        return
    work = tempfile.mkdtemp(prefix="almabench-")
    rows = []
    for step in STEPS:
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
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
