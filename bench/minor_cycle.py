"""The minor cycle alone: almapipe's compiled Hogbom (deconvolve.hogbom) against
radler's (WSClean's deconvolution library, `pip install radler`: never a
dependency of almapipe), on the same dirty image and PSF.

    .venv/bin/python bench/minor_cycle.py [--sizes 512,2048,4096] [--cell 1.0] [--niter 1000]

The plane: NGC 5921's field 2, channels 5~57, Briggs 0.5 (as bench/imaging_sizes.py),
its dirty image and its PSF of the same size (radler takes images of one shape;
ours is given the same PSF, zero beyond it). Both clean one minor cycle down to
the threshold clean() would set for the first major cycle (cyclefactor 1.5 x the
PSF's largest sidelobe x the peak, within tclean's 0.05-0.8 of it) or niter
components, gain 0.1, two threads.
Reported per size: seconds for the cycle (best of --repeat, after a first call
that compiles or warms up), components, the model's flux and the largest
difference between the two residuals, relative to the dirty peak.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plane(ms: str, npix: int, cell_arcsec: float):
    from almapipe.imaging import gridding
    from almapipe.imaging.imager import stokes_i
    from almapipe.imaging.measurement import OnePointing
    from almapipe.msio.ms import read_vis
    vis = read_vis(ms, field_ids=[2])
    chans = np.arange(5, 58)
    si = stokes_i(vis, chans)
    cell = np.radians(cell_arcsec / 3600)
    f = vis.freq[chans]
    w = gridding.briggs_weights(si.uvw, f, si.weight, npix, cell, 0.5).astype(np.float32)
    op = OnePointing(si.uvw, f, si.data, w, npix, cell)
    return (np.ascontiguousarray(op.dirty(), np.float32), np.ascontiguousarray(op.psf(npix), np.float32), cell)


def ours(dirty, psf, threshold, niter):
    from almapipe.imaging import deconvolve
    res, model = dirty.copy(), np.zeros(dirty.shape)
    n = deconvolve.hogbom(res, psf, model, 0.1, threshold, niter)
    return n, model, res


def radler_hogbom(dirty, psf, threshold, niter, beam_rad):
    import radler
    s = radler.Settings()
    s.algorithm_type = radler.AlgorithmType.generic_clean
    s.trimmed_image_width, s.trimmed_image_height = dirty.shape[1], dirty.shape[0]
    s.minor_iteration_count = niter
    s.minor_loop_gain = 0.1
    s.major_loop_gain = 1.0            # no threshold of its own: the absolute one is the cycle's
    s.absolute_threshold = float(threshold)
    s.thread_count = 2
    s.use_sub_minor_optimization = True
    # radler keeps views of these arrays: they must outlive it
    psf_kept, res, model = psf.copy(), dirty.copy(), np.zeros(dirty.shape, np.float32)
    r = radler.Radler(s, psf_kept, res, model, beam_rad)
    r.perform(0)
    return r.iteration_number, model, res


def best_of(fn, repeat):
    fn()                                # compile / warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,2048,4096")
    ap.add_argument("--cell", type=float, default=1.0)
    ap.add_argument("--niter", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ms", default="/tmp/imgsizes/ngc5921.ms")
    args = ap.parse_args()
    if not os.path.exists(args.ms):
        from almapipe.msio.uvfits import uvfits_to_ms
        os.makedirs(os.path.dirname(args.ms), exist_ok=True)
        uvfits_to_ms(os.path.join(HERE, "almapipe", "data", "ngc5921.uvfits.gz"), args.ms)
    from almapipe.imaging.deconvolve import _max_sidelobe, cycle_threshold
    print(f"{'npix':>6s} {'threshold':>10s} {'ours s':>8s} {'radler s':>9s} {'ratio':>6s} {'n ours':>7s} "
          f"{'n radler':>8s} {'flux ours':>10s} {'flux radler':>11s} {'max |dres|':>10s}")
    for npix in map(int, args.sizes.split(",")):
        dirty, psf, cell = plane(args.ms, npix, args.cell)
        rmax = float(np.abs(dirty).max())
        threshold = cycle_threshold(0.0, rmax, _max_sidelobe(psf), 1.5)
        t_ours, (n_o, m_o, r_o) = best_of(lambda: ours(dirty, psf, threshold, args.niter), args.repeat)
        t_rad, (n_r, m_r, r_r) = best_of(lambda: radler_hogbom(dirty, psf, threshold, args.niter, 50 / 206265),
                                         args.repeat)
        print(f"{npix:6d} {threshold:10.3g} {t_ours:8.2f} {t_rad:9.2f} {t_ours / t_rad:6.2f} {n_o:7d} {n_r:8d} "
              f"{m_o.sum():10.4g} {m_r.sum():11.4g} {np.abs(r_o - r_r).max() / rmax:10.2g}", flush=True)


if __name__ == "__main__":
    main()
