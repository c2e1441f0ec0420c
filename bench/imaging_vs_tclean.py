"""Imaging on a simulated ALMA EB: almapipe's imager against CASA's tclean, and a cube's
time with 1, 2 and 4 imager workers.

    .venv/bin/python bench/imaging_vs_tclean.py --ms EB/sim.ms [--casa-python PATH]
        [--field 3] [--niter 1000] [--cube-niter 10] [--workers 1,2,4] [--steps mfs,cube]
        [--spw 0] [--chans LO~HI] [--npix N --cell ARCSEC] [--time-average on|off|both]
        [--wsclean wsclean]

Steps, each a whole process, the same on both sides (image size and cell from the
pipeline's heuristics, Briggs 0.5, Hogbom, the given niter, no threshold):

  mfs    all spws of the target in one continuum image (ours: the aggregate of every
         channel, averaged in bins of 8; tclean: specmode 'mfs' over all spws)
  cube   every channel of spw --spw, or the channels --chans (ours: niter per channel;
         tclean: niter x nchan in total with cycleniter niter, so both clean each
         channel about as much). Ours averages the samples in time per baseline as
         makeimages' cubes do (decision 24; --time-average off: every integration, as
         tclean grids them; both: a row each)

  wsclean with --wsclean PROGRAM, the cube also with WSClean 3.1: one output channel per
         channel (-channels-out), each cleaned on its own with niter components
         (-mgain 0.8, -j 2), from every integration

--npix and --cell give the image's size (else the pipeline's heuristics on spw 0: a
long-baseline EB's ask for thousands of pixels, more than a cube can hold).

The worker figures run the cube as makeimages does with cube_chunks = N: N processes,
each cleaning a contiguous channel range, then one joining and restoring the planes
(whole wall time, including the join). On this 2-core machine more than two workers
cannot run at once; the point is how the time falls where cores allow.

CASA runs only where --casa-python names an interpreter with casatasks (never a
dependency of almapipe).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def heuristics(ms: str, field: int) -> tuple:
    import numpy as np
    from almapipe.msio.ms import read_vis
    from almapipe.heuristics.imaging import image_heuristics
    vis = read_vis(ms, 0, field_ids=[field])
    return image_heuristics(vis, 12.0, "ALMA", np.ones(len(vis.freq), bool))


def channel_range(nchan: int, chans: str) -> tuple:
    """(lo, hi) of the channels LO~HI (every channel of nchan where chans is empty)."""
    return tuple(map(int, chans.split("~"))) if chans else (0, nchan - 1)


def channel_mask(nchan: int, chans: str):
    """The channels LO~HI of nchan as a mask (all where chans is empty)."""
    import numpy as np
    mask = np.zeros(nchan, bool)
    lo, hi = channel_range(nchan, chans)
    mask[lo:hi + 1] = True
    return mask


def spw_nchan(ms: str, spw: int) -> int:
    """The number of channels of a spw (its SPECTRAL_WINDOW row; no data read)."""
    from almapipe.msio.ms import subtable
    with subtable(ms, "SPECTRAL_WINDOW") as t:
        return int(t.getcell("NUM_CHAN", spw))


def ours(step: str, ms: str, field: int, npix: int, cell: float, niter: int, chunk: str, out: str,
         spw: int = 0, chans: str = "", time_average: bool = True) -> None:
    import numpy as np
    from almapipe.imaging.imager import (ImageSpec, Planes, aggregate_continuum, clean_planes, join_planes,
                                         make_image, restore_planes)
    from almapipe.msio.ms import read_vis, spw_of_ddid
    if step == "mfs":
        parts = [(v, np.ones(len(v.freq), bool)) for v in
                 (read_vis(ms, s, field_ids=[field]) for s in sorted(set(spw_of_ddid(ms).values())))]
        vis = aggregate_continuum(parts, 8)
        make_image(vis, ImageSpec(field="t", npix=npix, cell_arcsec=cell, niter=niter, nsigma=0.0), 12.0, "ALMA")
        return
    vis = read_vis(ms, spw, field_ids=[field])
    # as makeimages' cubes: averaged at the spw's highest frequency, whatever the channels
    spec = ImageSpec(field="t", specmode="cube", npix=npix, cell_arcsec=cell, niter=niter, nsigma=0.0,
                     chans=channel_mask(len(vis.freq), chans), time_average=time_average,
                     time_average_freq_hz=float(vis.freq.max()))
    if step == "cube":
        make_image(vis, spec, 12.0, "ALMA")
    elif step == "piece":                      # one worker's channel range
        clean_planes(vis, ImageSpec(**{**spec.__dict__, "chans": channel_mask(len(vis.freq), chunk)})).save(out)
    elif step == "join":
        pieces = [Planes.load(path) for path in chunk.split(",")]
        restore_planes(join_planes(pieces), spec, 12.0, "ALMA")


def casa(step: str, ms: str, field: int, npix: int, cell: float, niter: int, out: str, spw: int = 0,
         chans: str = "") -> None:
    from casatasks import tclean
    common = dict(vis=ms, field=str(field), imsize=[npix, npix], cell=f"{cell}arcsec", weighting="briggs",
                  robust=0.5, deconvolver="hogbom", gridder="standard", threshold="0Jy", pbcor=True,
                  imagename=out)
    if step == "mfs":
        tclean(specmode="mfs", spw="", niter=niter, **common)
    else:
        from casatools import table
        tb = table()
        tb.open(f"{ms}/SPECTRAL_WINDOW")
        nchan = int(tb.getcell("NUM_CHAN", spw))
        tb.close()
        lo, hi = channel_range(nchan, chans)
        tclean(specmode="cube", spw=f"{spw}:{lo}~{hi}", niter=niter * (hi - lo + 1), cycleniter=niter, **common)


def wsclean_cube(args, npix: int, cell: float, work: str) -> float:
    """WSClean's cube of the same channels: its wall time (s)."""
    lo, hi = channel_range(spw_nchan(args.ms, args.spw), args.chans)
    out = os.path.join(work, "wsclean_cube")
    os.makedirs(out, exist_ok=True)
    cmd = [args.wsclean, "-quiet", "-name", os.path.join(out, "cube"), "-size", str(npix), str(npix),
           "-scale", f"{cell}asec", "-weight", "briggs", "0.5", "-niter", str(args.cube_niter), "-gain", "0.1",
           "-mgain", "0.8", "-field", str(args.field), "-spws", str(args.spw), "-channel-range", str(lo),
           str(hi + 1), "-channels-out", str(hi - lo + 1), "-no-dirty", "-data-column", "DATA", "-pol", "i",
           "-no-update-model-required", "-j", "2", os.path.abspath(args.ms)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"wsclean failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return wall


def timed(cmd: list, cwd: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", required=True)
    ap.add_argument("--casa-python", default="")
    ap.add_argument("--field", type=int, default=3)
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--cube-niter", type=int, default=10)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--steps", default="mfs,cube", help="which of mfs, cube to time against tclean")
    ap.add_argument("--child", choices=("ours", "casa"))
    ap.add_argument("--step")
    ap.add_argument("--npix", type=int)
    ap.add_argument("--cell", type=float)
    ap.add_argument("--chunk", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--spw", type=int, default=0, help="the cube's spw")
    ap.add_argument("--chans", default="", help="the cube's channels LO~HI (default all)")
    ap.add_argument("--wsclean", default="", help="the cube also with this WSClean program")
    ap.add_argument("--time-average", choices=("on", "off", "both"), default="on",
                    help="ours' cube averaged in time per baseline, as makeimages' (decision 24)")
    args = ap.parse_args()
    if args.child == "ours":
        return ours(args.step, args.ms, args.field, args.npix, args.cell, args.niter, args.chunk, args.out,
                    args.spw, args.chans, args.time_average == "on")
    if args.child == "casa":
        return casa(args.step, args.ms, args.field, args.npix, args.cell, args.niter, args.out, args.spw,
                    args.chans)
    cell, npix = (args.cell, args.npix) if args.npix and args.cell else heuristics(args.ms, args.field)
    work = tempfile.mkdtemp(prefix="imgbench-")
    me = [sys.executable, os.path.abspath(__file__), "--ms", os.path.abspath(args.ms), "--field", str(args.field),
          "--npix", str(npix), "--cell", str(cell), "--spw", str(args.spw), "--chans", args.chans]
    rows = []
    averaging = ["on", "off"] if args.time_average == "both" else [args.time_average]
    for step, niter in (("mfs", args.niter), ("cube", args.cube_niter)):
        if step not in args.steps.split(","):
            continue
        for k, avg in enumerate(averaging if step == "cube" else ["on"]):
            a = timed(me + ["--child", "ours", "--step", step, "--niter", str(niter), "--time-average", avg], work)
            b = None
            if args.casa_python and k == 0:
                cmd = [args.casa_python] + me[1:] + ["--child", "casa", "--step", step, "--niter", str(niter),
                                                     "--out", os.path.join(work, f"casa_{step}")]
                b = timed(cmd, work)
            name = step if step == "mfs" or avg == "on" else f"{step}, every integration"
            rows.append({"step": name, "almapipe_s": a, "casa_s": b})
        if step == "cube" and args.wsclean:
            rows[-len(averaging)]["wsclean_s"] = wsclean_cube(args, npix, cell, work)
    # the cube with N workers: N piece processes at once, then the join
    first, last = channel_range(spw_nchan(args.ms, args.spw), args.chans)
    nchan = last - first + 1
    scaling = []
    for n in map(int, filter(None, args.workers.split(","))):
        edges = [first + round(k * nchan / n) for k in range(n + 1)]
        outs = [os.path.join(work, f"piece{n}_{k}.npz") for k in range(n)]
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   ALMAPIPE_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
        t0 = time.perf_counter()
        # the pieces averaged in time as the first of the table's cubes
        pieces_avg = ["--time-average", averaging[0]]
        procs = [subprocess.Popen(me + ["--child", "ours", "--step", "piece", "--niter", str(args.cube_niter),
                                        "--chunk", f"{edges[k]}~{edges[k + 1] - 1}", "--out", outs[k]]
                                  + pieces_avg,
                                  env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for k in range(n)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a piece of the {n}-worker cube failed")
        timed(me + ["--child", "ours", "--step", "join", "--niter", str(args.cube_niter),
                    "--chunk", ",".join(outs)] + pieces_avg, work)
        scaling.append({"workers": n, "cube_s": time.perf_counter() - t0})
    print(f"image {npix} x {npix}, cell {cell:.3f} arcsec, {nchan} channels in the cube")
    print(f"{'step':28s} {'almapipe (s)':>13s} {'tclean (s)':>11s} {'ratio':>7s}")
    for r in rows:
        ratio = r["almapipe_s"] / r["casa_s"] if r["casa_s"] else float("nan")
        print(f"{r['step']:28s} {r['almapipe_s']:13.1f} {r['casa_s'] or float('nan'):11.1f} {ratio:7.2f}"
              + (f"   WSClean {r['wsclean_s']:.1f} s, ours / WSClean {r['almapipe_s'] / r['wsclean_s']:.2f}"
                 if r.get("wsclean_s") else ""))
    for s in scaling:
        print(f"cube with {s['workers']} worker(s): {s['cube_s']:.1f} s")
    print(json.dumps({"rows": rows, "scaling": scaling, "npix": npix, "cell_arcsec": cell}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
