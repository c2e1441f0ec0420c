"""CLEAN at growing image sizes on NGC 5921: almapipe (this tree, and optionally an older
checkout) against WSClean and, where given, CASA's tclean: whole processes, wall time and
peak memory.

    .venv/bin/python bench/imaging_sizes.py [--sizes 512,2048,4096] [--cell 1.0]
        [--niter 1000] [--base-src DIR] [--wsclean wsclean] [--work DIR] [--preset NAME]
        [--casa-python PATH] [--threads 1,2,4,8,16]

Every run images the same data the same way: field 2 (N5921_2) of the built-in
NGC 5921 UVFITS (written to an MS once, raw DATA: the imaging work does not depend
on calibration), channels 5~57 in one mfs plane, Stokes I, Briggs 0.5, Hogbom,
gain 0.1, niter components, no threshold.

  ours     this tree's make_image (each major cycle cleans down to cyclefactor 1.5 x
           the PSF's largest sidelobe of its peak, within tclean's 0.05-0.8, as
           makeimages runs it)
  base     the same child run against another checkout of almapipe (--base-src: a
           directory holding its almapipe/ package, e.g. `git archive <commit> |
           tar -x -C DIR`), to compare before and after a change
  --preset instead of NGC 5921, the target of a simulator preset (e.g. longbaseline:
           C-8 pads, 4 FDM spws of 3840 channels), ideally calibrated and split into its
           own MS as bench/mtmfs_vs_wsclean.py makes it; all its science spws in one mfs
           plane, ours in bins of 8 channels as makeimages' aggregate continuum makes
           them (samples.read_aggregate_samples: each spw read in blocks of rows and
           binned as read; MSPartition gives it the MS's rows as the store would),
           WSClean from every channel

  wsclean  WSClean on the same MS (-mgain 0.8: major cycles, as ours; -j 2), if the
           program is installed (Debian: apt-get install wsclean)
  tclean   with --casa-python PATH (a Python with casatasks, in its own venv): CASA's
           tclean on the same MS and selection, mfs, Hogbom, gridder 'standard', its
           default cycles (cyclefactor 1, no limit on major cycles), pbcor off

  --threads ours again with ALMAPIPE_THREADS set to each count (columns ours@N): the
           gridder's, the Briggs weights' and the minor cycle's threads, on a machine
           with the cores

Each run is one process started cold; its peak resident memory is the child's
ru_maxrss (os.wait4). Numba's compiled kernels are cached on disk by a first
(unrecorded) 256-pixel run of ours, so compile time is not counted.
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

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELD, CHANS = 2, (5, 57)


def child(ms: str, npix: int, cell: float, niter: int) -> None:
    """One image with the almapipe found on sys.path (this tree or --base-src)."""
    import numpy as np
    from almapipe.imaging.imager import ImageSpec, make_image
    from almapipe.msio.ms import read_vis
    meta = preset_meta(ms)
    if meta:
        from almapipe.imaging.imager import restore_planes
        from almapipe.imaging.samples import clean_mfs, read_aggregate_samples
        spec = ImageSpec(field="Target", npix=npix, cell_arcsec=cell, robust=0.5, niter=niter, nsigma=0.0)
        spws = [MSPartition(ms, sid, meta["field"]) for sid in meta["spws"]]
        samples = read_aggregate_samples([([(p, None)], np.ones(len(p.freq), bool)) for p in spws], 8)
        res = restore_planes(clean_mfs(samples, spec), spec, 12.0, "ALMA")
    else:
        vis = read_vis(ms, field_ids=[FIELD])
        chans = np.zeros(len(vis.freq), bool)
        chans[CHANS[0]:CHANS[1] + 1] = True
        spec = ImageSpec(field="N5921_2", npix=npix, cell_arcsec=cell, robust=0.5, niter=niter, nsigma=0.0,
                         chans=chans)
        res = make_image(vis, spec, 25.0, "VLA")
    print(json.dumps({"iterations": res.iterations, "beam": list(res.beam), "peak": float(res.image.max())}))


class MSPartition:
    """One spw of an MS, read in blocks of rows, with the few methods of a store partition
    (almapipe.platform.visstore.VisPartition) that samples.read_aggregate_samples uses:
    the child then streams a preset's spws into their binned samples as makeimages
    streams them from the store, holding the samples and two blocks of rows (one read
    ahead, as VisPartition.blocks holds them), never an spw's rows x channels (it read
    each spw whole before 2026-12-05). A block is the store's row chunk
    (visstore.chunking) over the channels asked for."""

    def __init__(self, ms: str, spw: int, field: int):
        import casacore.tables as ct
        import numpy as np
        from almapipe.msio.ms import corr_types_of_spw, spw_rows_query, subtable
        self.ms = ms
        with ct.table(ms, ack=False) as t:
            sel = t.query(spw_rows_query(ms, spw, [field]), sortlist="TIME,ANTENNA1,ANTENNA2")
            self.ms_rows = np.asarray(sel.rownumbers(), np.int64)
            self.cols = {c: sel.getcol(c) for c in ("TIME", "ANTENNA1", "ANTENNA2", "FIELD_ID", "UVW")}
            sel.close()
        with subtable(ms, "SPECTRAL_WINDOW") as t:
            self.freq = t.getcell("CHAN_FREQ", spw)
        self.corr_types = corr_types_of_spw(ms, spw)

    def index(self, column: str):
        """A row column of the spw's rows (the store's index arrays; UVW too)."""
        return self.cols[column]

    row_array = index

    def select(self, field_ids=None, cross_only: bool = False):
        import numpy as np
        keep = np.ones(len(self.ms_rows), bool)
        if field_ids is not None:
            keep &= np.isin(self.cols["FIELD_ID"], list(field_ids))
        if cross_only:
            keep &= self.cols["ANTENNA1"] != self.cols["ANTENNA2"]
        return np.flatnonzero(keep)

    def blocks(self, column="DATA", field_ids=None, chan=None, cross_only=False, block_chunks=1, **_):
        import types
        import casacore.tables as ct
        import numpy as np
        from almapipe.platform.visstore import chunking
        rows = self.select(field_ids, cross_only)
        chan = chan or slice(0, len(self.freq))
        ncorr = len(self.corr_types)
        # the store's blocks: whole row chunks of the spw's rows, those selected in each
        step = chunking(len(self.freq), ncorr)[0] * max(int(block_chunks), 1)
        bounds = np.searchsorted(rows, np.arange(0, len(self.ms_rows) + step, step))
        blc, trc = [chan.start, 0], [chan.stop - 1, ncorr - 1]

        def read(t, r):
            sub = t.selectrows(self.ms_rows[r].tolist())
            flag = sub.getcolslice("FLAG", blc, trc) | sub.getcol("FLAG_ROW")[:, None, None]
            blk = types.SimpleNamespace(rows=r, uvw=self.cols["UVW"][r], flag=flag,
                                        data=sub.getcolslice(column, blc, trc).astype(np.complex64, copy=False),
                                        weight=sub.getcol("WEIGHT").astype(np.float32, copy=False))
            sub.close()
            return blk
        with ct.table(self.ms, ack=False) as t:
            held = None
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                if hi > lo:
                    blk = read(t, rows[lo:hi])      # the next block, read before this one is used
                    if held is not None:
                        yield held
                    held = blk
                    del blk
            if held is not None:
                yield held


def tclean_child(ms: str, npix: int, cell: float, niter: int, field: str, spw: str, out: str) -> None:
    """One image with CASA's tclean (run by --casa-python; imports no almapipe)."""
    from casatasks import tclean
    from casatools import image
    summary = tclean(vis=ms, imagename=out, field=field, spw=spw, specmode="mfs", imsize=[npix, npix],
                     cell=f"{cell}arcsec", stokes="I", datacolumn="data", weighting="briggs", robust=0.5,
                     deconvolver="hogbom", gridder="standard", niter=niter, gain=0.1, threshold="0Jy", pbcor=False) or {}
    ia = image()
    ia.open(out + ".image")
    peak = float(ia.getchunk().max())
    ia.close()
    # its components and major cycles, where this CASA's tclean returns its summary
    print(json.dumps({"peak": peak, "iterations": summary.get("iterdone"), "major_cycles": summary.get("nmajordone")},
                     default=int))


def preset_meta(ms: str) -> dict | None:
    """The field and spws of a preset's target MS (bench.json beside it), None for NGC 5921."""
    path = os.path.join(os.path.dirname(ms), "bench.json")
    return json.load(open(path)) if os.path.exists(path) else None


def run_measured(cmd: list, env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall time (s) and peak RSS (MiB) of one process (os.wait4 on it)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:8])} failed:\n{err.read()[-3000:]}")
        lines = out.read().strip().splitlines()
    return {"wall_s": wall, "rss_mib": usage.ru_maxrss / 1024.0, "stdout": lines[-1] if lines else ""}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,2048,4096")
    ap.add_argument("--cell", type=float, default=1.0, help="arcsec")
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--base-src", default="")
    ap.add_argument("--wsclean", default="wsclean")
    ap.add_argument("--work", default="")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--ms", default="")
    ap.add_argument("--npix", type=int)
    ap.add_argument("--preset", default="")
    ap.add_argument("--make-ms", action="store_true")
    ap.add_argument("--casa-python", default="", help="a Python with casatasks: tclean on the same data")
    ap.add_argument("--tclean-child", nargs=3, metavar=("FIELD", "SPW", "OUT"))
    ap.add_argument("--threads", default="", help="ours once with each of these ALMAPIPE_THREADS "
                    "(comma separated, e.g. 1,2,4,8,16): how the imager scales with cores")
    args = ap.parse_args()
    if args.tclean_child:
        return tclean_child(args.ms, args.npix, args.cell, args.niter, *args.tclean_child)
    if args.child:
        return child(args.ms, args.npix, args.cell, args.niter)
    if args.make_ms:
        if not args.preset:
            from almapipe.msio.uvfits import uvfits_to_ms
            return uvfits_to_ms(os.path.join(HERE, "almapipe", "data", "ngc5921.uvfits.gz"), args.ms)
        from mtmfs_vs_wsclean import make_target_ms
        return make_target_ms(os.path.dirname(args.ms), args.ms, args.preset)
    work = args.work or tempfile.mkdtemp(prefix="imgsizes-")
    os.makedirs(work, exist_ok=True)
    ms = os.path.join(work, "target.ms" if args.preset else "ngc5921.ms")
    if not os.path.exists(ms):
        # in a process of its own: a child's ru_maxrss starts from the size of the process
        # it was forked from (the kernel keeps the high-water mark across exec), so a
        # parent that had made the MS itself would lift every small image's figure to its
        # own (WSClean's 66 MiB at 512² read 179 MiB that way)
        run_measured([sys.executable, os.path.abspath(__file__), "--make-ms", "--preset", args.preset,
                      "--ms", ms], env=dict(os.environ, PYTHONPATH=HERE), cwd=work)
    if args.preset:
        meta = preset_meta(ms)
        selection = ["-field", str(meta["field"]), "-spws", ",".join(map(str, meta["spws"]))]
        casa_selection = [str(meta["field"]), ",".join(map(str, meta["spws"]))]
    else:
        selection = ["-field", str(FIELD), "-channel-range", str(CHANS[0]), str(CHANS[1] + 1)]
        casa_selection = [str(FIELD), f"0:{CHANS[0]}~{CHANS[1]}"]
    wsclean = shutil.which(args.wsclean)
    sides = {"ours": (HERE, {})}
    if args.base_src:
        sides["base"] = (os.path.abspath(args.base_src), {})
    for t in filter(None, args.threads.split(",")):
        sides[f"ours@{t}"] = (HERE, {"ALMAPIPE_THREADS": t})
    me = [sys.executable, os.path.abspath(__file__), "--child", "--ms", ms, "--cell", str(args.cell),
          "--niter", str(args.niter)]
    for src, _ in sides.values():                    # numba's caches, not timed
        run_measured(me + ["--npix", "256"], env=dict(os.environ, PYTHONPATH=src), cwd=work)
    rows = []
    for npix in map(int, args.sizes.split(",")):
        row = {"npix": npix}
        for name, (src, env) in sides.items():
            r = run_measured(me + ["--npix", str(npix)], env=dict(os.environ, PYTHONPATH=src, **env), cwd=work)
            row[name] = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"], **json.loads(r["stdout"])}
        if wsclean:
            r = run_measured([wsclean, "-quiet", "-name", os.path.join(work, f"wsc{npix}"), "-size", str(npix),
                              str(npix), "-scale", f"{args.cell}asec", "-weight", "briggs", "0.5",
                              "-niter", str(args.niter), "-gain", "0.1", "-mgain", "0.8", *selection,
                              "-data-column", "DATA",
                              "-pol", "i", "-no-update-model-required", "-j", "2", ms], cwd=work)
            row["wsclean"] = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"]}
        if args.casa_python:
            out = os.path.join(work, f"tclean{npix}")
            for suffix in (".image", ".model", ".psf", ".residual", ".sumwt", ".pb"):
                shutil.rmtree(out + suffix, ignore_errors=True)
            r = run_measured([args.casa_python, os.path.abspath(__file__), "--ms", ms, "--npix", str(npix),
                              "--cell", str(args.cell), "--niter", str(args.niter), "--tclean-child",
                              *casa_selection, out], cwd=work)
            row["tclean"] = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"], **json.loads(r["stdout"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = [n for n in ("base", "ours", "wsclean", "tclean") if n in rows[0]] + [n for n in sides if "@" in n]
    print(f"{'npix':>6s} " + " ".join(f"{n + ' s':>10s} {n + ' MiB':>12s}" for n in names)
          + ("  ours/wsclean" if "wsclean" in names else "") + ("  ours/base" if "base" in names else "")
          + ("  ours/tclean" if "tclean" in names else ""))
    for row in rows:
        line = f"{row['npix']:6d} " + " ".join(f"{row[n]['wall_s']:10.1f} {row[n]['rss_mib']:12.0f}" for n in names)
        if "wsclean" in names:
            line += f"  {row['ours']['wall_s'] / row['wsclean']['wall_s']:13.2f}"
        if "base" in names:
            line += f"  {row['ours']['wall_s'] / row['base']['wall_s']:9.2f}"
        if "tclean" in names:
            line += f"  {row['ours']['wall_s'] / row['tclean']['wall_s']:11.2f}"
        print(line)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
