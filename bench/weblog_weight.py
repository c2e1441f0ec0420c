"""The weight of the per-antenna WebLog plots for a 43-antenna x 4-spw EB (the 'realistic'
preset's shape), drawn by the stages' own plot functions on synthetic solutions, so the
page-weight budget (50 MB in all, 5 MB a page) can be checked without running that EB.

    .venv/bin/python bench/weblog_weight.py [--nant 43] [--nspw 4] [--nchan 128] [--out DIR]

Prints each plot's size and, per stage page, the sum of its plots (the page's HTML is a
few kB more). Image views do not depend on the number of antennas: measure them on the
small preset's WebLog (tests/test_alma.py::test_weblog_in_a_real_browser prints them).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from almapipe.calibration.caltable import CalSolutions
from almapipe.msio.ms import Vis
from almapipe.stages import alma, calibration, outlierflag


class PlotIO:
    """The one StageIO method the plot functions use: save a figure as the stage would."""

    def __init__(self, out: str):
        self.out, self.sizes = out, {}

    def plot(self, fig, name: str) -> dict:
        import matplotlib.pyplot as plt
        path = os.path.join(self.out, name)
        fig.savefig(path, dpi=80, bbox_inches="tight")     # as StageIO.plot
        plt.close(fig)
        self.sizes[name] = os.path.getsize(path)
        return {"name": name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nant", type=int, default=43)
    ap.add_argument("--nspw", type=int, default=4)
    ap.add_argument("--nchan", type=int, default=128)
    ap.add_argument("--ntime", type=int, default=60, help="gain solutions per antenna")
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="weblog-weight-"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(1)
    nant, nchan = a.nant, a.nchan
    ctx = {"observation": {"antennas": [{"id": i, "name": f"DA{41 + i}", "has_data": True} for i in range(nant)]},
           "fields": [{"id": 0, "name": "J1924-2914", "intents": ["BANDPASS", "FLUX"]},
                      {"id": 1, "name": "J1832-2039", "intents": ["PHASE"]},
                      {"id": 2, "name": "Target", "intents": ["TARGET"]}]}
    pages = {"bandpass": PlotIO(a.out), "gaincal": PlotIO(a.out), "timegaincal": PlotIO(a.out),
             "tsyscal": PlotIO(a.out), "tsysflag": PlotIO(a.out), "gainflag": PlotIO(a.out),
             "wvrgcal": PlotIO(a.out), "applycal": PlotIO(a.out)}
    freq = 230e9 + np.arange(nchan) * 15.6e6
    for spw in range(a.nspw):
        ant = np.arange(nant)
        bp = (1 + 0.05 * rng.standard_normal((nant, nchan, 2))) * np.exp(1j * rng.normal(0, 0.2, (nant, nchan, 2)))
        sol = CalSolutions("B", spw, freq, np.zeros(nant), np.ones(nant), np.zeros(nant, int), np.ones(nant, int),
                           ant, bp, np.zeros(bp.shape, bool), np.full(bp.shape, 50.0))
        calibration._plot_bandpass(pages["bandpass"], sol, ctx, spw)
        t = np.repeat(np.linspace(0, 3600, a.ntime), nant)
        g = (1 + 0.05 * rng.standard_normal((len(t), 1, 2))) * np.exp(1j * rng.normal(0, 0.5, (len(t), 1, 2)))
        gsol = CalSolutions("G", spw, freq[:1], t, np.ones(len(t)), np.tile(np.arange(a.ntime) % 2, nant),
                            np.ones(len(t), int), np.tile(ant, a.ntime), g, np.zeros(g.shape, bool),
                            np.full(g.shape, 50.0))
        for name in ("gaincal", "timegaincal"):
            calibration._plot_gains(pages[name], gsol, ctx, spw, name)
        tsys = 80 + 5 * rng.standard_normal((nant * 4, nchan, 2))
        alma._plot_tsys(pages["tsyscal"], tsys, np.repeat(ant, 4), freq, spw, ctx["observation"]["antennas"])
        alma._plot_tsysflag(pages["tsysflag"], tsys, np.repeat(ant, 4), freq, spw, ctx["observation"]["antennas"],
                            {3}, np.arange(nchan) < 4)
        outlierflag._plot_gain_outliers(pages["gainflag"], gsol, ctx["observation"]["antennas"], spw, {3: "low"})
        # calibrated visibilities: every baseline at 150 times, 16 channels (the plot
        # averages channels; its size depends on the points drawn, capped per field)
        a1, a2 = np.triu_indices(nant, 1)
        nt = 150
        rows = len(a1) * nt
        v = (1 + 0.1 * rng.standard_normal((rows, 16, 2))).astype(np.complex64)
        vis = Vis(time=np.repeat(np.arange(nt) * 6.0, len(a1)), interval=np.full(rows, 6.0),
                  ant1=np.tile(a1, nt), ant2=np.tile(a2, nt), field_id=np.repeat(np.arange(nt) % 2, len(a1)),
                  scan=np.ones(rows, int), uvw=rng.normal(0, 100, (rows, 3)), data=v,
                  flag=np.zeros(v.shape, bool), weight=np.ones((rows, 2), np.float32), freq=freq[:16], spw=spw)
        calibration._plot_calibrated(pages["applycal"], vis, v, vis.flag, ctx, spw)
    path = np.cumsum(rng.normal(0, 1e-5, (200, nant)), axis=0)
    alma._plot_wvr(pages["wvrgcal"], np.arange(200) * 10.0, path, ctx["observation"]["antennas"])
    total = 0
    for stage, io in pages.items():
        s = sum(io.sizes.values())
        total += s
        print(f"{stage:12s} {len(io.sizes):2d} plots {s / 1e6:6.2f} MB (largest {max(io.sizes.values()) / 1e3:.0f} kB)")
    print(f"{'all':12s} {sum(len(io.sizes) for io in pages.values()):2d} plots {total / 1e6:6.2f} MB   in {a.out}")


if __name__ == "__main__":
    main()
