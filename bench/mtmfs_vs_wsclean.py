"""Multi-term (nterms = 2) continuum over a wide band: almapipe's mtmfs against WSClean's
wide-band clean, whole processes, wall time and peak memory.

    .venv/bin/python bench/mtmfs_vs_wsclean.py [--sizes 256,1024] [--cell 0.6] [--niter 1000]
        [--base-src DIR] [--wsclean wsclean] [--work DIR]

The data: the simulator's `wideband` preset (16 antennas, Band 3 spws at 90.5, 92.5,
102.5 and 104.5 GHz, 32 channels each; continuum sources of spectral index -0.8 and
+2.0), its target's science spws replaced by ideally calibrated data
(Simulator.calibrate_target_ideally, 0.5 Jy of noise per visibility).

  ours     makeimages' aggregate: the 4 spws' channels in bins of 8 (aggregate_samples),
           Briggs 0.5, mtmfs nterms=2 (imager.clean_taylor), restored tt0/tt1/alpha
  base     the same child run against another checkout of almapipe (--base-src, as in
           imaging_sizes.py)
  wsclean  the same field and spws, Briggs 0.5, -join-channels -channels-out 4
           -fit-spectral-pol 2 (one output channel per spw, a 2-term polynomial fitted
           to each component's spectrum), -mgain 0.8, -j 2

Both clean Hogbom to niter or 3 sigma (ours: nsigma 3 of the tt0 residual; WSClean:
-auto-threshold 3). Each run is one cold process; peak memory is its ru_maxrss. A
first, unrecorded 128-pixel run of ours fills numba's cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
from imaging_sizes import run_measured  # noqa: E402


def child(ms: str, npix: int, cell: float, niter: int) -> None:
    import numpy as np
    from almapipe.imaging.imager import ImageSpec, aggregate_samples, clean_taylor, restore_taylor_planes
    from almapipe.msio.ms import read_vis
    meta = json.load(open(os.path.join(os.path.dirname(ms), "bench.json")))
    parts = []
    for sid in meta["spws"]:
        v = read_vis(ms, sid, field_ids=[meta["field"]])
        parts.append((v, np.ones(len(v.freq), bool)))
    vis, row_freq = aggregate_samples(parts, 8)
    del parts
    spec = ImageSpec(field="Target", npix=npix, cell_arcsec=cell, robust=0.5, niter=niter, nsigma=3.0, nterms=2)
    tp = clean_taylor(vis, spec, row_freq)
    _, ti = restore_taylor_planes(tp, spec, 12.0, "ALMA")
    y, x = np.unravel_index(np.argmax(ti.tt[0]), ti.tt[0].shape)
    print(json.dumps({"iterations": tp.result.iterations, "peak": float(ti.tt[0][y, x]),
                      "alpha": float(ti.alpha[y, x]), "alpha_error": float(ti.alpha_error[y, x])}))


def make_target_ms(work: str, ms: str, preset: str = "wideband") -> None:
    """The preset's EB, its target ideally calibrated, and the target's science spws in
    their own MS (as split makes it), which both imagers read. Its POLARIZATION row 0
    (the WVR spw's single correlation) is made the science spws' XX, YY: WSClean 3.1
    takes the first row's correlations for every spw and refuses Stokes I otherwise."""
    import casacore.tables as ct
    from almapipe.simulate.simulator import SimConfig, Simulator
    sim = Simulator(SimConfig.preset(preset, target_line_jy=0.0))
    eb = os.path.join(work, f"{preset}.ms")
    sim.write(work, preset)
    sim.calibrate_target_ideally(eb, noise_jy=0.5)
    field = next(i for i, f in enumerate(sim.fields) if f[3] == "TARGET")
    with ct.table(eb, ack=False) as t:
        sel = t.query(f"FIELD_ID=={field} AND DATA_DESC_ID IN {list(sim.science_spw_ids)}")
        sel.copy(ms, deep=True).close()
        sel.close()
    with ct.table(os.path.join(ms, "POLARIZATION"), readonly=False, ack=False) as p:
        science = int(ct.table(os.path.join(ms, "DATA_DESCRIPTION"), ack=False).getcell(
            "POLARIZATION_ID", sim.science_spw_ids[0]))
        for col in ("CORR_TYPE", "CORR_PRODUCT", "NUM_CORR"):
            p.putcell(col, 0, p.getcell(col, science))
    shutil.rmtree(eb)
    json.dump({"spws": sim.science_spw_ids, "field": field}, open(os.path.join(work, "bench.json"), "w"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--cell", type=float, default=0.6, help="arcsec")
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--base-src", default="")
    ap.add_argument("--wsclean", default="wsclean")
    ap.add_argument("--work", default="")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--make-ms", action="store_true")
    ap.add_argument("--ms", default="")
    ap.add_argument("--npix", type=int)
    args = ap.parse_args()
    if args.child:
        return child(args.ms, args.npix, args.cell, args.niter)
    if args.make_ms:
        return make_target_ms(os.path.dirname(args.ms), args.ms)
    work = args.work or tempfile.mkdtemp(prefix="mtmfs-")
    os.makedirs(work, exist_ok=True)
    ms = os.path.join(work, "target.ms")
    if not os.path.exists(ms):
        # in a process of its own: a child forked from a parent that imported the simulator
        # would start with the parent's peak RSS in its ru_maxrss (Linux keeps it across exec)
        run_measured([sys.executable, os.path.abspath(__file__), "--make-ms", "--ms", ms],
                     env=dict(os.environ, PYTHONPATH=HERE), cwd=work)
    meta = json.load(open(os.path.join(work, "bench.json")))
    me = [sys.executable, os.path.abspath(__file__), "--child", "--ms", ms, "--cell", str(args.cell),
          "--niter", str(args.niter)]
    sides = {"ours": HERE}
    if args.base_src:
        sides["base"] = os.path.abspath(args.base_src)
    for src in sides.values():                                        # numba's caches, not timed
        run_measured(me + ["--npix", "128"], env=dict(os.environ, PYTHONPATH=src), cwd=work)
    wsclean = shutil.which(args.wsclean)
    rows = []
    for npix in map(int, args.sizes.split(",")):
        row = {"npix": npix}
        for name, src in sides.items():
            r = run_measured(me + ["--npix", str(npix)], env=dict(os.environ, PYTHONPATH=src), cwd=work)
            row[name] = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"], **json.loads(r["stdout"])}
        if wsclean:
            name = os.path.join(work, f"wsc{npix}")
            r = run_measured([wsclean, "-quiet", "-name", name, "-size", str(npix), str(npix),
                              "-scale", f"{args.cell}asec", "-weight", "briggs", "0.5", "-niter", str(args.niter),
                              "-gain", "0.1", "-mgain", "0.8", "-auto-threshold", "3",
                              "-field", str(meta["field"]), "-spws", ",".join(map(str, meta["spws"])),
                              "-join-channels", "-channels-out", "4", "-fit-spectral-pol", "2",
                              "-data-column", "DATA", "-pol", "i", "-no-update-model-required", "-j", "2", ms],
                             cwd=work)
            peak = float(json.loads(run_measured(
                [sys.executable, "-c", "import sys; from astropy.io import fits; "
                 "print(float(fits.getdata(sys.argv[1]).max()))", f"{name}-MFS-image.fits"])["stdout"]))
            row["wsclean"] = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"], "peak": peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'npix':>6s} {'base s':>8s} {'base MiB':>9s} {'ours s':>8s} {'ours MiB':>9s} {'wsclean s':>10s} "
          f"{'wsclean MiB':>12s} {'ours/wsclean':>12s} {'ours/base':>9s}")
    nan = {"wall_s": float("nan"), "rss_mib": float("nan")}
    for row in rows:
        b, o, w = row.get("base", nan), row["ours"], row.get("wsclean", nan)
        print(f"{row['npix']:6d} {b['wall_s']:8.1f} {b['rss_mib']:9.0f} {o['wall_s']:8.1f} {o['rss_mib']:9.0f} "
              f"{w['wall_s']:10.1f} {w['rss_mib']:12.0f} {o['wall_s'] / w['wall_s']:12.2f} "
              f"{o['wall_s'] / b['wall_s']:9.2f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
