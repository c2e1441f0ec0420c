"""Time the calibration and imaging steps on NGC 5921, side by side with CASA's tasks
when casatasks is importable (it is never a dependency of almapipe).

    .venv/bin/python bench/ngc5921_stages.py [--repeat 3]

Prints, per step, the median wall time of almapipe's kernel, CASA's task on the same MS
and the ratio almapipe/CASA. Whole-process comparisons: time `almapipe run` with
/usr/bin/time -v.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from almapipe.calibration.applycal import GainApply, apply_tables
from almapipe.calibration.fluxmodels import perley_butler_2017
from almapipe.calibration.terms import SolveSpec, point_model, solve_term
from almapipe.imaging.imager import ImageSpec, make_image
from almapipe.imaging.uvcontsub import parse_channels, subtract_continuum
from almapipe.msio.ms import read_vis
from almapipe.msio.uvfits import uvfits_to_ms

DATA = os.path.join(os.path.dirname(__file__), "..", "almapipe", "data", "ngc5921.uvfits.gz")


def timed(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def ours(ms, repeat):
    vis = read_vis(ms)
    vis.flag |= (vis.ant1 == vis.ant2)[:, None, None]
    cal = vis.select(vis.field_id < 2)
    bpc = cal.select(cal.field_id == 0)
    m3c = point_model(bpc, {0: lambda f: perley_butler_2017("3C286", f)})
    res = {}
    res["bandpass"], bp = timed(lambda: solve_term(bpc, m3c, SolveSpec(kind="B", combine="scan", refant=14, solnorm=True)), repeat)
    mall = point_model(cal, {0: lambda f: perley_butler_2017("3C286", f), 1: lambda f: np.ones_like(f)})
    res["gaincal"], g = timed(lambda: solve_term(cal, mall, SolveSpec(kind="G", refant=14, chans=slice(6, 57), preapply=[bp])), repeat)
    tgt = vis.select(vis.field_id == 2)
    res["applycal"], (d, f, w) = timed(lambda: apply_tables(tgt, [GainApply(bp, interp="nearest"), GainApply(g, gainfield=[1])]), repeat)
    tgt.data, tgt.flag = d, f
    mask = parse_channels("4~6;50~59", 63)
    res["uvcontsub"], (line, _) = timed(lambda: subtract_continuum(tgt.data, tgt.flag, mask, 0), repeat)
    tgt.data = line
    spec = ImageSpec(field="N5921_2", specmode="cube", npix=256, cell_arcsec=15, robust=0.5, niter=1000,
                     chans=parse_channels("5~50", 63))
    res["cube (46 ch, 256^2)"], _ = timed(lambda: make_image(tgt, spec, 25.0, "VLA"), max(1, repeat // 2))
    return res


def casa(ms, repeat):
    try:
        from casatasks import applycal, bandpass, gaincal, tclean, uvcontsub  # noqa: F401
    except ImportError:
        return None
    work = tempfile.mkdtemp()
    res = {}
    res["bandpass"], _ = timed(lambda: bandpass(vis=ms, caltable=f"{work}/b", field="0", solint="inf", combine="scan",
                                                refant="14", solnorm=True), repeat)
    res["gaincal"], _ = timed(lambda: gaincal(vis=ms, caltable=f"{work}/g", field="0,1", spw="0:6~56", solint="inf",
                                              refant="14", gaintable=[f"{work}/b"]), repeat)
    res["applycal"], _ = timed(lambda: applycal(vis=ms, field="2", gaintable=[f"{work}/b", f"{work}/g"],
                                                gainfield=["", "1"]), repeat)
    shutil.rmtree(work)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    ms = os.path.join(tmp, "ngc5921.ms")
    uvfits_to_ms(DATA, ms)
    a = ours(ms, args.repeat)
    b = casa(ms, args.repeat) or {}
    print(f"{'step':22s} {'almapipe (s)':>12s} {'CASA (s)':>10s} {'ratio':>7s}")
    for k, v in a.items():
        c = b.get(k)
        print(f"{k:22s} {v:12.3f} {c if c is not None else float('nan'):10.3f} "
              f"{v / c if c else float('nan'):7.2f}")
    if not b:
        print("(casatasks not installed: pip install casatasks casadata for the CASA column)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
