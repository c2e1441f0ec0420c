"""The WebLog's pieces without a stack: per-reason QA entries, the per-antenna bandpass
plot naming an injected outlier, the applycal plot refusing to draw no data, and the
triage Home renders from a context (the whole WebLog in a browser: test_alma.py)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from almapipe.calibration.caltable import CalSolutions
from almapipe.msio.ms import Vis
from almapipe.report import weblog
from almapipe.report.plots import EmptyPlotError, robust_outliers
from almapipe.stages import calibration
from almapipe.stages.base import QA


class PlotIO:
    def __init__(self, out):
        self.out, self.names = out, []

    def plot(self, fig, name):
        from almapipe.report import render
        render.draw(fig, str(self.out / name), {"dpi": 40})
        self.names.append(name)
        return {"name": name}


def antennas(n):
    return {"observation": {"antennas": [{"id": i, "name": f"DA{41 + i}", "has_data": True} for i in range(n)]},
            "fields": [{"id": 0, "name": "J1924-2914", "intents": ["BANDPASS"]},
                       {"id": 1, "name": "Target", "intents": ["TARGET"]}]}


def test_qa_keeps_each_reason_with_its_score_metric_and_evidence():
    qa = QA()
    qa.lower(0.7, "spw 5: antenna DA45 off.", metric="bandpass.antenna_shape", evidence="bandpass_spw5.png")
    qa.lower(0.9, "a reason from an older caller")
    qa.note("a note")
    assert qa.score == 0.7 and len(qa.reasons) == 3
    assert qa.metrics == [{"score": 0.7, "reason": "spw 5: antenna DA45 off.", "metric": "bandpass.antenna_shape",
                           "evidence": "bandpass_spw5.png"},
                          {"score": 0.9, "reason": "a reason from an older caller", "metric": "", "evidence": ""}]
    json.dumps(qa.metrics)          # the context stays JSON


def test_bandpass_plot_names_the_injected_outlier_and_the_flagged_antenna(tmp_path):
    rng = np.random.default_rng(3)
    nant, nchan = 12, 64
    ctx = antennas(nant)
    bp = (1 + 0.01 * rng.standard_normal((nant, nchan, 2))).astype(complex)
    bp[4] *= np.linspace(0.7, 1.3, nchan)[:, None]           # DA45: a tilted bandpass
    flag = np.zeros(bp.shape, bool)
    flag[9] = True                                           # DA50: no solutions
    sol = CalSolutions("B", 5, np.arange(nchan) * 1e6, np.zeros(nant), np.ones(nant), np.zeros(nant, int),
                       np.ones(nant, int), np.arange(nant), bp, flag, np.full(bp.shape, 50.0))
    io = PlotIO(tmp_path)
    outliers, unsolved = calibration._plot_bandpass(io, sol, ctx, 5)
    assert [o["antenna"] for o in outliers] == ["DA45"] and unsolved == ["DA50"]
    assert io.names == ["bandpass_spw5.png", "bandpass_phase_spw5.png"]
    assert robust_outliers({f"a{i}": 1.0 + 0.01 * i for i in range(10)}, floor=0.05) == {}


def test_applycal_plot_skips_nan_rows_and_refuses_to_draw_nothing(tmp_path):
    ctx = antennas(4)
    a1, a2 = np.triu_indices(4, 1)
    rows = len(a1) * 5
    data = np.ones((rows, 8, 2), np.complex64)
    data[::3] = np.nan                                       # NaN rows, as ALMA data have
    vis = Vis(time=np.repeat(np.arange(5.0), len(a1)), interval=np.ones(rows), ant1=np.tile(a1, 5),
              ant2=np.tile(a2, 5), field_id=np.zeros(rows, int), scan=np.ones(rows, int),
              uvw=np.ones((rows, 3)), data=data, flag=np.zeros(data.shape, bool), weight=np.ones((rows, 2)),
              freq=np.arange(8) * 1e6)
    io = PlotIO(tmp_path)
    calibration._plot_calibrated(io, vis, data, vis.flag, ctx, 5)
    assert io.names == ["applycal_spw5.png"]
    counts = calibration.FlagCounts(4)           # applycal's flagging summary, summed over row blocks
    half = rows // 2
    counts.add(vis.select(np.arange(rows) < half), vis.flag[:half])
    counts.add(vis.select(np.arange(rows) >= half), np.ones_like(vis.flag[half:]))
    calibration._record_flag_summary(ctx, counts, 5)
    assert ctx["flag_summary"]["5"]["fields"] == {"J1924-2914": (rows - half) / rows}
    with pytest.raises(EmptyPlotError, match="applycal plot of spw 5"):
        calibration._plot_calibrated(io, vis, data, np.ones(data.shape, bool), ctx, 5)


def test_home_opens_with_the_triage(tmp_path):
    def result(i, name, score, metrics=(), reasons=()):
        return {"index": i, "name": name, "service": "calibrator", "qa_score": score, "qa_reasons": list(reasons),
                "qa_metrics": list(metrics), "duration_s": 1.0, "params": {}, "log": [f"{name} log"]}
    ctx = {"run_id": "r1", "input_key": "in", "recipe": {"name": "alma_calimage", "version": 1, "stages": [
        {"name": n} for n in ("importdata", "lowgainflag", "tsyscal", "bandpass", "weblog")]},
        "flags": {"lowgainflag": ["DA48"]}, "fields": [], "observation": {},
        "bandpass_antennas": {"outliers": [{"antenna": "DA45", "spw": 5, "why": "amplitude shape off"}],
                              "no_solutions": {"5": ["DA48"]}},
        "stage_results": [
            result(0, "importdata", 1.0),
            result(1, "lowgainflag", 0.88, [{"score": 0.88, "reason": "Flagged antenna(s) DA48.",
                                              "metric": "lowgainflag.antennas_flagged",
                                              "evidence": "table-low-gain"}], ["Flagged antenna(s) DA48."]),
            result(3, "bandpass", 0.8, [{"score": 0.8, "reason": "DA45 off", "metric": "bandpass.antenna_shape",
                                         "evidence": "bandpass_spw5.png"}], ["DA45 off"])]}
    (tmp_path / "s03_bandpass_spw5.png").write_bytes(b"")
    weblog.render(ctx, str(tmp_path), {3: ["s03_bandpass_spw5.png"]}, current_index=4)
    home = (tmp_path / "index.html").read_text()
    triage = home.split('id="triage"', 1)[1].split("</section>", 1)[0]
    lows = re.findall(r'href="(stage\d\.html#[^"]+)"', triage.split("Outliers named")[0])
    assert lows[:2] == ["stage3.html#ev-bandpass-spw5-png", "stage1.html#ev-table-low-gain"]   # lowest first
    assert "antenna DA48" in triage and "antenna DA45 spw 5" in triage
    assert "Skipped (not run): 2. tsyscal" in re.sub(r"\s+", " ", triage)
    assert "1 of 3 stages scored 0.9 or more" in triage
    assert 'id="ev-table-low-gain"' in (tmp_path / "stage1.html").read_text()
    assert 'id="ev-bandpass-spw5-png"' in (tmp_path / "stage3.html").read_text()
    assert (tmp_path / "stage3.log").read_text() == "bandpass log\n"


def test_a_stage_page_lists_the_metrics_its_stage_declares(tmp_path):
    """Each declared metric with what it measures and its score: 1.00 "passed" when it
    lowered nothing, else its lowest score and every reason with its evidence link; a
    score of an older context without a metric is listed under the stage's name."""
    from almapipe.stages.base import REGISTRY
    ctx = {"run_id": "r1", "input_key": "in", "recipe": {"name": "x", "version": 1, "stages": []},
           "flags": {}, "fields": [], "observation": {}, "stage_results": [
               {"index": 0, "name": "bandpass", "service": "calibrator", "qa_score": 0.7, "qa_reasons": [],
                "duration_s": 1.0, "params": {}, "log": [], "qa_metrics": [
                    {"score": 0.8, "reason": "DA45 off", "metric": "bandpass.antenna_shape",
                     "evidence": "bandpass_spw5.png"},
                    {"score": 0.8, "reason": "DA46 off", "metric": "bandpass.antenna_shape",
                     "evidence": "bandpass_spw5.png"},
                    {"score": 0.7, "reason": "from an older run", "metric": "", "evidence": ""}]}]}
    (tmp_path / "s00_bandpass_spw5.png").write_bytes(b"")
    weblog.render(ctx, str(tmp_path), {0: ["s00_bandpass_spw5.png"]})
    page = (tmp_path / "stage0.html").read_text()
    table = page.split('<table class="metrics">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]
    metrics = [re.search(r"<td>([^<]*)</td>", r).group(1) for r in rows]
    declared = [m.name for m in REGISTRY["bandpass"].qa]
    assert metrics[:2] == ["bandpass", "bandpass.antenna_shape"]       # lowest first
    assert sorted(metrics[2:]) == sorted(set(declared) - {"bandpass.antenna_shape"})
    shape = rows[1]
    assert "DA45 off" in shape and "DA46 off" in shape and 'href="#ev-bandpass-spw5-png"' in shape
    assert REGISTRY["bandpass"].metric("bandpass.antenna_shape").doc.split("'")[0] in shape
    assert all("1.00</span> passed" in r for r in rows[2:])


def _write_image_files(tmp_path, base, suffixes, nplane=1, npix=64):
    """FITS products of a synthetic image, named as makeimages names them: {suffix: path}."""
    from almapipe.imaging.products import image_header, write_fits
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:npix, :npix] - npix // 2
    point = np.exp(-(xx ** 2 + yy ** 2) / 8.0)
    freqs = 230e9 + np.arange(nplane) * 1e6
    planes = {"psf": np.repeat(point[None], nplane, 0), "pb": np.repeat(np.exp(-(xx ** 2 + yy ** 2) / 800.0)[None],
                                                                          nplane, 0),
              "mask": np.ones((nplane, npix, npix)), "alpha": np.where(point > 0.3, -0.7, np.nan)[None]}
    model = np.zeros((nplane, npix, npix))
    model[:, npix // 2, npix // 2] = 0.9
    planes["model"] = model
    files = {}
    for suffix in suffixes:
        kind = suffix.split(".tt")[0].replace("tt0.", "").replace(".tt0", "")
        kind = {"tt0": "image", "tt0.pbcor": "pbcor", "tt1": "image"}.get(suffix, kind)
        data = planes.get(kind, np.repeat(point[None], nplane, 0) + 0.01 * rng.standard_normal((nplane, npix, npix)))
        hdr = image_header(0.5, -0.4, npix, np.radians(0.1 / 3600), freqs, "LSRK", "Jy/beam", (0.5, 0.4, 30.0),
                           "J1924-2914", "ALMA", bandwidth_hz=2e9)
        path = tmp_path / f"{base}.{suffix}.fits"
        write_fits(str(path), data, hdr)
        files[suffix] = str(path)
    return files


def test_image_pages_show_psf_model_and_the_taylor_terms(tmp_path, monkeypatch):
    """Every image gets a page: a single-term image with its PSF and model views, a
    multi-term one from its tt0 products (and its alpha), a cube with its per-plane PSF;
    one figure each."""
    from almapipe.report import images
    drawn = {}
    sky_panel = images._sky_panel

    def record(fig, pos, plane, hdr, title, unit, **kw):
        drawn.setdefault(current[0], []).append(title)
        return sky_panel(fig, pos, plane, hdr, title, unit, **kw)
    monkeypatch.setattr(images, "_sky_panel", record)
    single = _write_image_files(tmp_path, "x.J1924_bp.spw5.mfs.I", ("image", "pbcor", "pb", "mask", "residual",
                                                                    "psf", "model"))
    taylor = _write_image_files(tmp_path, "x.Target_sci.spw5_7.cont.I", (
        "tt0", "tt0.pbcor", "pb.tt0", "mask", "residual.tt0", "psf.tt0", "model.tt0", "tt1", "residual.tt1",
        "model.tt1", "alpha", "alpha.error"))
    cube = _write_image_files(tmp_path, "x.Target_sci.spw5.cube.I", ("image", "pbcor", "pb", "mask", "residual",
                                                                     "psf", "model"), nplane=4)
    common = {"beam_arcsec": [0.5, 0.4, 30.0], "rms_jy_per_beam": 0.01, "peak_jy_per_beam": 1.0, "field": "x"}
    ctx = {"observation": {"spws": []}, "images": [
        dict(common, file="x.J1924_bp.spw5.mfs.I.pbcor.fits", files=single, specmode="mfs", spw="5"),
        dict(common, file="x.Target_sci.spw5_7.cont.I.tt0.pbcor.fits", files=taylor, specmode="cont",
             spw="5_7", alpha=-0.7),
        dict(common, file="x.Target_sci.spw5.cube.I.pbcor.fits", files=cube, specmode="cube", spw="5")]}
    current = [None]
    real_view = images.image_view

    def view(ctx_, img, paths, out_png):
        current[0] = img["file"]
        return real_view(ctx_, img, paths, out_png)
    monkeypatch.setattr(images, "image_view", view)
    out = tmp_path / "web"
    out.mkdir()
    views = images.image_views(ctx, lambda key: key, str(out))
    assert [v["plot"] for v in views] == ["image0.png", "image1.png", "image2.png"]
    assert sorted(p.name for p in out.iterdir()) == ["image0.png", "image1.png", "image2.png"]
    s, t, c = (drawn[i["file"]] for i in ctx["images"])
    assert s[0] == "pbcor" and {"residual", "mask", "pb", "psf"} <= set(s)
    assert any(x.startswith("model: 1 component pixels, 900.00 mJy") for x in s)
    assert t[0] == "pbcor" and {"residual", "psf"} <= set(t) and any(x.startswith("model") for x in t)
    assert "spectral index (alpha -0.70 at the peak)" in t
    assert c[0].startswith("pbcor, peak plane") and any(x.startswith("psf, plane") for x in c)
    assert all((out / v["plot"]).stat().st_size < 600e3 for v in views)
    # the paths the views take: a tt0 product for its view, the first one found
    assert images.view_paths({"tt0.pbcor": "k1", "psf.tt0": "k2", "tt1": "k3"}, str.upper) == \
        {"pbcor": "K1", "psf": "K2"}


def test_tsysflag_and_gainflag_plots_frame_their_outliers(tmp_path, monkeypatch):
    """tsysflag's per-antenna Tsys panels and gainflag's per-antenna gain panels mark
    the antennas they flag as outliers, and their QA scores point at those plots."""
    from almapipe.report import plots
    from almapipe.stages import alma, outlierflag
    states = {}

    def label(ax, name, state=""):
        states[name] = state
    monkeypatch.setattr(alma, "label_panel", label)
    monkeypatch.setattr(plots, "label_panel", label)
    rng = np.random.default_rng(2)
    nant, nchan = 10, 64
    ctx = antennas(nant)
    ant = np.repeat(np.arange(nant), 3)
    tsys = 80 + rng.standard_normal((len(ant), nchan, 2))
    tsys[ant == 6] *= 3                                           # DA47: a hot receiver
    rows, chans, found = alma.tsys_outliers(tsys, ant, {})
    assert [(test, a) for test, a, _ in found] == [("antenna", 6)]
    io = PlotIO(tmp_path)
    name = alma._plot_tsysflag(io, tsys, ant, 230e9 + np.arange(nchan) * 1e6, 5, ctx["observation"]["antennas"],
                               {6}, chans)
    assert name == "tsysflag_spw5.png" and io.names == [name]
    assert {k for k, v in states.items() if v == "outlier"} == {"DA47"}
    assert alma.tsys_flags(["spw 5: antenna DA47"], name)[0].evidence == name
    # gains: DA44 at a third of the others
    states.clear()
    ntime = 20
    t = np.repeat(np.arange(ntime) * 60.0, nant)
    a = np.tile(np.arange(nant), ntime)
    g = (1 + 0.02 * rng.standard_normal((len(t), 1, 2))).astype(complex)
    g[a == 3] /= 3
    sol = CalSolutions("G", 5, np.array([230e9]), t, np.ones(len(t)), np.zeros(len(t), int), np.ones(len(t), int),
                       a, g, np.zeros(g.shape, bool), np.full(g.shape, 50.0))
    bad = outlierflag.gain_outliers(sol)
    assert set(bad) == {3}
    io = PlotIO(tmp_path)
    name = outlierflag._plot_gain_outliers(io, sol, ctx["observation"]["antennas"], 5, bad)
    assert name == "gainflag_spw5.png" and io.names == [name]
    assert {k for k, v in states.items() if v == "outlier"} == {"DA44"}
    assert outlierflag.gain_outlier_antennas(1, nant, 1, name)[0].evidence == name
    sol.flag[:] = True                                            # nothing to draw: no plot, no error
    assert outlierflag._plot_gain_outliers(io, sol, ctx["observation"]["antennas"], 5, {}) is None


# ------------------------------------------------------------------ figures drawn beside the stage

def _grid_figure():
    from almapipe.report.plots import antenna_grid, label_panel
    fig, axes = antenna_grid(12, "bandpass amplitude, spw 5")
    rng = np.random.default_rng(1)
    for i, ax in enumerate(axes):
        ax.plot(np.arange(64), 1 + 0.1 * rng.standard_normal(64), lw=0.6)
        label_panel(ax, f"DA{41 + i}", "outlier" if i == 3 else "")
    return fig


def _lambda_figure():
    """A matplotlib figure that cannot be pickled (a lambda formatter)."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mticker
    fig, ax = plt.subplots()
    ax.plot(np.arange(64), np.arange(64.0))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:.1f}"))
    return fig


def _pixels(path):
    import matplotlib.image as mimage
    return mimage.imread(str(path))


def test_an_antenna_grid_is_data_until_drawn_and_draws_each_panel_in_one_axes(tmp_path):
    """report/panels.py: a grid records what its panels show (it pickles small), shares
    one x and y range over every panel, cuts lines at NaN, frames an outlier red, and
    draws into a single Axes (the figure of 43 matplotlib Axes took ~1.3 s a grid)."""
    import pickle
    from almapipe.report import panels
    from almapipe.report.plots import antenna_grid, label_panel
    grid, axes = antenna_grid(43, "Tsys per antenna")
    x = np.linspace(90, 92, 128)
    for i, ax in enumerate(axes):
        y = 100 + np.arange(128.0) + i
        y[60:64] = np.nan                                  # a flagged run: the line is cut there
        ax.plot(x, y, lw=0.8, color="C0")
        ax.plot(x[::8], y[::8] - 50, ".", ms=1.5, color="C1")
        ax.axvspan(90.0, 90.2)
        ax.axhline(300.0)
        label_panel(ax, f"DA{41 + i}", "outlier" if i == 7 else "flagged" if i == 8 else "")
    with pytest.raises(ValueError, match="format"):
        axes[0].plot(x, x, "o-")
    assert len(pickle.dumps(grid)) < 1_000_000
    assert len(panels._runs(np.arange(5.0), np.array([1, 2, np.nan, 4, 5.0]))) == 2
    fig = grid.to_figure()
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert (grid.ncol, grid.nrow) == (8, 6) and ax.get_xlim() == (0, 8)
    # the shared range covers every panel's data, the horizontal line included
    (x0, x1), (y0, y1) = grid.limits()
    assert x0 < 90 and x1 > 92 and y0 < 50 and y1 > 300
    png = tmp_path / "grid.png"
    grid.savefig(png, dpi=80, bbox_inches="tight")
    rgb = _pixels(png)[..., :3]
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert red.sum() > 100                                # DA48's frame
    label_panel(axes[7], "DA48", "")
    grid.savefig(tmp_path / "none.png", dpi=80)
    rgb = _pixels(tmp_path / "none.png")[..., :3]
    assert ((rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum() == 0


def test_a_figure_drawn_in_the_helper_is_the_png_the_stage_would_draw(tmp_path, monkeypatch):
    """StageIO.plot hands a figure to a helper process (report/render.py); the PNG is
    pixel for pixel the one drawn in the stage's own thread (ALMAPIPE_PLOT_PROCESSES=0),
    and a figure that cannot be pickled is drawn in the stage's thread."""
    from almapipe.report import render
    opts = dict(dpi=80, bbox_inches="tight")
    pending = render.submit(_grid_figure(), str(tmp_path / "helper.png"), **opts)
    assert pending.future is not None                    # handed over, not drawn here
    monkeypatch.setenv("ALMAPIPE_PLOT_PROCESSES", "0")
    render.submit(_grid_figure(), str(tmp_path / "here.png"), **opts).wait()
    monkeypatch.delenv("ALMAPIPE_PLOT_PROCESSES")
    np.testing.assert_array_equal(_pixels(pending.wait()), _pixels(tmp_path / "here.png"))
    local = render.submit(_lambda_figure(), str(tmp_path / "lambda.png"), **opts)
    assert local.future is None and _pixels(local.wait()).shape[0] > 100
    # any function beside the stage (the WebLog's image views): in the helper, or here
    # when it cannot be pickled
    assert render.Beside(os.getpid, ()).result() != os.getpid()
    assert render.Beside(lambda: os.getpid(), ()).result() == os.getpid()


def test_a_helper_that_died_loses_no_figure(tmp_path):
    """The helper killed (-9): the figure it was to draw is drawn in the stage's thread,
    and the next figure goes to a new helper."""
    import signal
    from almapipe.report import render
    render.submit(_grid_figure(), str(tmp_path / "first.png")).wait()      # the helper is up
    pool = render._pool()
    for proc in list(pool._processes.values()):
        os.kill(proc.pid, signal.SIGKILL)
    lost = render.submit(_grid_figure(), str(tmp_path / "second.png"))
    assert _pixels(lost.wait()).shape == _pixels(tmp_path / "first.png").shape
    after = render.submit(_grid_figure(), str(tmp_path / "third.png"))
    assert after.future is not None and render._pool() is not pool
    assert _pixels(after.wait()).shape == _pixels(tmp_path / "first.png").shape
