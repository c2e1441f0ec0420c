"""Small pieces of the ALMA stages, without the stack: the bandpass phase-up
interval, fluxcalflag's line table, online-flag commands, the reference antenna
kept continuous where it has no solution, and the phase-only SNR."""
from __future__ import annotations

import numpy as np
import pytest

from almapipe.calibration import solver
from almapipe.calibration.terms import _continue_reference
from almapipe.stages.alma import line_channels
from almapipe.errors import ParameterError
from almapipe.heuristics.callibrary import field_map
from almapipe.heuristics.solints import phaseup_interval
from almapipe.heuristics.flagging import FlagSelection, parse_template, parse_timerange, template_mask
from almapipe.msio.ms import Vis


def test_phaseup_interval_grows_with_the_snr_needed_and_is_capped_by_the_scan():
    assert phaseup_interval(60.0, 6.0, 120.0, 20.0) == (1, 60.0)
    n, snr = phaseup_interval(10.0, 6.0, 120.0, 20.0)        # (20/10)^2 = 4 integrations
    assert n == 4 and snr == pytest.approx(20.0)
    n, snr = phaseup_interval(2.0, 6.0, 60.0, 20.0, min_solutions=2)   # would need 100; 5 leave 2 per scan
    assert n == 5 and snr < 20.0


def test_fluxcalflag_flags_lines_of_solar_system_bodies_only():
    freq = np.linspace(229.5e9, 231.5e9, 200)
    titan = line_channels("Titan", freq)
    assert titan.any() and np.all(np.abs(freq[titan] / 1e9 - 230.538) <= 0.15)
    assert not line_channels("J1924-2914", freq).any()
    assert line_channels("Neptune", freq).sum() > titan.sum()          # Neptune's CO is broad
    assert not line_channels("Titan", np.linspace(240e9, 242e9, 64)).any()


def test_timerange_in_casa_syntax():
    day0 = 61161.0 * 86400                                            # 2026-05-01
    ((lo, hi),) = parse_timerange("2026/05/01/05:57:04.840~2026/05/01/05:58:04.840", day0)
    assert lo == pytest.approx(day0 + 5 * 3600 + 57 * 60 + 4.84, abs=1e-3) and hi - lo == pytest.approx(60.0)
    ((lo2, hi2),) = parse_timerange("05:57:04.84~05:58:04.84", day0 + 100.0)
    assert lo2 == pytest.approx(lo, abs=1e-3) and hi2 == pytest.approx(hi, abs=1e-3)
    with pytest.raises(ParameterError, match="timerange"):
        parse_timerange("yesterday~today", day0)


def test_online_flag_command_selects_an_antenna_and_a_time_range():
    t = 61161.0 * 86400 + np.repeat(np.arange(10) * 6.0 + 3.0, 3)
    ant1, ant2 = np.tile([0, 0, 1], 10), np.tile([1, 2, 2], 10)
    vis = Vis(time=t, interval=np.full(30, 6.0), ant1=ant1, ant2=ant2, uvw=np.zeros((30, 3)),
              data=np.ones((30, 4, 2), complex), flag=np.zeros((30, 4, 2), bool), weight=np.ones((30, 2)),
              field_id=np.zeros(30, int), scan=np.ones(30, int), state_id=np.zeros(30, int),
              freq=np.arange(4.0), corr_types=["XX", "YY"], spw=0, rows=np.arange(30))
    (cmd,) = parse_template("antenna='A2&&*' timerange='2026/05/01/00:00:12~2026/05/01/00:00:24'")
    ants = [{"id": i, "name": f"A{i}", "station": f"P{i}"} for i in range(3)]
    m = template_mask(vis, cmd, ants, [], 0)[:, 0, 0]
    # integrations centred at 15 and 21 s lie inside, those at 9 and 27 s overlap the ends
    assert set(np.unique(vis.time[m] - vis.time[0] + 3.0)) == {9.0, 15.0, 21.0, 27.0}
    assert np.all((vis.ant1[m] == 2) | (vis.ant2[m] == 2))


def test_a_selection_flags_what_its_mask_flags():
    """flagdata flags through Selections (rows x channels x correlations) rather than
    block-sized masks: the flags set and the count of newly flagged samples are the mask's."""
    rng = np.random.default_rng(7)
    shape = (40, 16, 4)
    for rows, chans, corrs in [(rng.random(40) < 0.2, None, None), (rng.random(40) < 0.5, rng.random(16) < 0.3, None),
                               (rng.random(40) < 0.5, None, np.array([True, False, False, True])),
                               (rng.random(40) < 0.5, rng.random(16) < 0.3, np.array([False, True, True, False])),
                               (np.zeros(40, bool), None, None), (np.ones(40, bool), np.zeros(16, bool), None)]:
        sel = FlagSelection(rows, chans, corrs)
        flag = rng.random(shape) < 0.3
        want = flag | sel.mask(shape)
        new = int((sel.mask(shape) & ~flag).sum())
        assert sel.flag(flag) == new
        assert np.array_equal(flag, want)
    with pytest.raises(ValueError, match="3 correlations for a block of 4"):
        FlagSelection(np.ones(40, bool), None, np.ones(3, bool)).flag(np.zeros(shape, bool))


def test_reference_antenna_kept_continuous_where_it_has_no_solution():
    """Slot 1 has no reference antenna (0), so the solver referred it to antenna 1;
    afterwards its phases continue those of slot 0 (the antennas drift little)."""
    rng = np.random.default_rng(3)
    p0 = rng.uniform(-np.pi, np.pi, 5)
    p1 = p0 + 0.05 * rng.normal(size=5)
    g = np.empty((2, 1, 1, 5), complex)
    g[0, 0, 0] = np.exp(1j * (p0 - p0[0]))
    g[1, 0, 0] = np.exp(1j * (p1 - p1[1]))
    bad = np.zeros(g.shape, bool)
    bad[1, 0, 0, 0] = True
    _continue_reference(g, bad, np.array([0.0, 6.0]), 0)
    jump = np.angle(g[1, 0, 0, 1:] * np.conj(g[0, 0, 0, 1:]))
    assert np.abs(jump).max() < 0.2


def test_phase_only_snr_measures_noise_not_amplitude_mismatch():
    """Antenna amplitudes differ by 20 %; the phase-only solve's SNR must match the
    amplitude-and-phase solve's, which fits them."""
    rng = np.random.default_rng(1)
    nant, nslot, sigma = 10, 4, 0.05
    g = (1 + 0.2 * rng.normal(size=(nslot, nant))) * np.exp(1j * rng.uniform(-3, 3, (nslot, nant)))
    X = g[:, :, None] * np.conj(g[:, None, :])
    noise = sigma * (rng.normal(size=X.shape) + 1j * rng.normal(size=X.shape))
    noise = (noise + np.conj(np.transpose(noise, (0, 2, 1)))) / 2
    X = X + noise
    W = np.ones(X.shape) - np.eye(nant)[None]
    _, snr_ap, _ = solver.solve(X, W, "ap", 0)
    _, snr_p, _ = solver.solve(X, W, "p", 0)
    assert np.median(snr_p / snr_ap) == pytest.approx(1.0, rel=0.1)


def test_tsysflag_finds_outlier_rough_spectra_edges_and_birdies():
    from almapipe.stages.alma import tsys_outliers
    rng = np.random.default_rng(0)
    nant, nchan = 8, 64
    ch = np.linspace(0, 1, nchan)
    base = 100 * (1 + 1.5 * np.exp(-((ch - 0.9) / 0.1) ** 2))          # an atmospheric line: kept
    antenna = np.repeat(np.arange(nant), 2)
    tsys = np.repeat(base[None, :, None], 2 * nant, axis=0).repeat(2, axis=2)
    tsys *= rng.uniform(0.9, 1.1, (2 * nant, 1, 1)) * (1 + 0.001 * rng.normal(size=tsys.shape))
    tsys[antenna == 5] *= 4.0                                          # an outlier antenna
    tsys[antenna == 3] *= 1 + 0.1 * (-1) ** np.arange(nchan)[None, :, None]   # rough spectrum
    tsys[:, :3] *= 6.0                                                 # filter roll-off at the low edge
    tsys[:, 40] *= 1.5                                                 # a birdie
    rows, chans, found = tsys_outliers(tsys, antenna, {})
    assert set(antenna[rows]) == {3, 5}
    assert set(np.flatnonzero(chans)) == {0, 1, 2, 40}
    assert {f[0] for f in found} == {"antenna", "derivative", "edges", "birdie"}


@pytest.mark.parametrize("flux_jy, weak", [(3.0, False), (0.01, True)])
def test_bandpass_phaseup_interval_from_the_calibrators_snr(tmp_path, flux_jy, weak):
    """A bright bandpass calibrator is phased up per integration; a very weak one gets
    a longer interval and a named QA warning that even that is not enough."""
    from almapipe.calibration.terms import point_model
    from almapipe.msio import ms as msio
    from almapipe.simulate.simulator import SimConfig, Simulator
    from almapipe.stages.base import QA
    from almapipe.stages.calibration import _phaseup_solint_from_snr
    sim = Simulator(SimConfig.preset("small", nant=6, target_scans=1, bp_flux_jy=flux_jy, dead_antenna=False))
    res = sim.write(str(tmp_path))
    vis = msio.read_vis(res["ms"], sim.science_spw_ids[0], field_ids=[0])
    from almapipe.heuristics.flagging import shadow_mask
    vis.flag |= ((vis.ant1 == vis.ant2) | shadow_mask(vis.time, vis.ant1, vis.ant2, vis.uvw, np.full(6, 12.0)))[:, None, None]
    for spw, ch in sim.bad_channels:             # rawflagchans has flagged these before the bandpass
        if spw == 0:
            vis.flag[:, ch] = True
    model = point_model(vis, {0: lambda f: np.ones_like(f)})
    qa, ctx = QA(), {"fields": [{"id": 0, "name": "J1924-2914"}]}
    solint = _phaseup_solint_from_snr(vis, model, 1, slice(3, 29), [], {"phaseup_snr": 20.0}, qa, ctx, 0)
    if weak:
        assert solint != "int" and qa.score < 1 and "too weak" in " ".join(qa.reasons)
    else:
        assert solint == "int" and qa.score == 1.0
    assert ctx["bandpass_phaseup"]["0"]["solint"] == solint


def test_dynamic_range_correction_of_the_threshold():
    from almapipe.heuristics.imaging import dr_correction
    assert dr_correction(1e-3, 0.015, False, 12.0) == (pytest.approx(2e-3), 1.0)          # DR 15
    assert dr_correction(1e-3, 0.040, False, 12.0) == (pytest.approx(3e-3), 1.5)          # DR 40
    assert dr_correction(1e-3, 0.080, False, 12.0)[1] == 2.0
    assert dr_correction(1e-3, 0.120, False, 12.0)[1] == 2.5
    thr, f = dr_correction(1e-3, 0.6, False, 12.0)                                       # DR 600 > 150
    assert thr == pytest.approx(0.6 / 150 * 2) and f == pytest.approx(4.0)
    assert dr_correction(1e-3, 0.015, False, 7.0)[1] == 2.0                               # ACA steps
    thr, f = dr_correction(1e-3, 3.0, True, 12.0)                                        # calibrator: peak/1000
    assert thr == pytest.approx(6e-3) and f == pytest.approx(3.0)


def test_a_long_baseline_image_too_large_for_its_limits_is_narrowed_as_hif_checkproductsize_narrows_it():
    """The long-baseline preset's geometry (beam 0.045", ALMA's 12 m primary beam of 25"
    at 230 GHz): 4320 pixels of 0.009" cover the primary beam to 0.2. Over max_imsize the
    image keeps its cell and covers less of the primary beam; a 3840-channel cube over
    max_cube_gb goes to 3 pixels a beam as well; below the primary beam's 0.7 level it is
    refused, naming its limits; a mosaic is never narrowed."""
    from almapipe.heuristics.imaging import ImageGeometry, fast_size_below, mitigate_size
    from almapipe.imaging.gridding import good_size
    geom = ImageGeometry(beam_arcsec=0.045, pb_fwhm_arcsec=25.0)
    assert mitigate_size(geom, 8192) == mitigate_size(geom, 8192, 0.0, 3840)
    same = mitigate_size(geom, 8192)
    assert (same.cell_arcsec, same.npix, same.mitigation, same.refused) == (0.009, 4320, "", "")
    mfs = mitigate_size(geom, 4096)
    assert (mfs.cell_arcsec, mfs.npix) == (0.009, 4096) and not mfs.refused
    assert "covering the primary beam to 0.22 of its peak" in mfs.mitigation
    assert 0.18 < geom.pb_level_at_edge(4320, 0.009) <= 0.2       # rounded up to a fast size
    cube = mitigate_size(geom, 4096, 40e9, 3840)                    # ALMA's maxcubesize
    assert cube.cell_arcsec == 0.015 and 4.0 * cube.npix ** 2 * 3840 <= 40e9 and not cube.refused
    assert cube.npix == fast_size_below(int((40e9 / 4 / 3840) ** 0.5)) and good_size(cube.npix) == cube.npix
    assert "3 across the beam" in cube.mitigation and "max_cube_gb 40 for 3840 planes" in cube.mitigation
    small = mitigate_size(geom, 4096, 2e9, 3840)                     # under the 0.7 level even at 3 a beam
    assert small.refused and "1200 x 1200" in small.refused and "give imsize" in small.refused
    assert mitigate_size(geom, 4096, mosaic=True).refused.endswith("or larger limits")
    assert "a mosaic is not narrowed" in mitigate_size(geom, 4096, mosaic=True).refused
    # an FDM spw's cube (nbin 2 allowed) is binned first: at 40 GB binned and narrowed
    binned = mitigate_size(geom, 4096, 40e9, 3840, nbin=2)
    assert binned.nbin == 2 and 4.0 * binned.npix ** 2 * 1920 <= 40e9 and binned.npix > cube.npix
    assert "channels binned by 2 (1920 planes), made" in binned.mitigation
    refused = mitigate_size(geom, 4096, 2e9, 3840, nbin=2).refused
    assert refused and "even with channels binned by 2 (1920 planes) and narrowed to 0.7" in refused


def test_an_fdm_cube_over_max_cube_gb_is_binned_by_two_channels_before_it_is_narrowed():
    """hif_checkproductsize's first step: the cube of an FDM spw (3840 or 7680 channels;
    1920, 960 or 480 not averaged online, whose channels' effective bandwidth is 2.667
    widths) that exceeds max_cube_gb is made of planes of two channels. An ordinary
    3840-channel cube of 480 x 480 pixels (3.5 GB at 2 GB) then keeps its size and
    cell; a TDM spw's or an averaged FDM spw's is narrowed instead."""
    from almapipe.heuristics.imaging import ImageGeometry, cube_nbin, mitigate_size
    width = 488.28125e3
    assert cube_nbin(3840, width, width) == cube_nbin(7680, -width, width) == 2
    assert cube_nbin(1920, width, 2.667 * width) == cube_nbin(480, -width, 2.667 * width) == 2
    assert cube_nbin(1920, width, width) == cube_nbin(128, 15.625e6, 15.625e6) == cube_nbin(3840 // 4, width, None) == 1
    geom = ImageGeometry(beam_arcsec=0.4, pb_fwhm_arcsec=25.0)
    cell0, npix0 = geom.cell_npix()
    assert 4.0 * npix0 ** 2 * 3840 > 2e9 >= 4.0 * npix0 ** 2 * 1920, npix0
    binned = mitigate_size(geom, 4096, 2e9, 3840, nbin=2)
    assert (binned.cell_arcsec, binned.npix, binned.nbin) == (cell0, npix0, 2)
    assert binned.mitigation.endswith(": channels binned by 2 (1920 planes)")
    narrowed = mitigate_size(geom, 4096, 2e9, 3840)
    assert narrowed.nbin == 1 and narrowed.npix < npix0 and "binned" not in narrowed.mitigation
    assert mitigate_size(geom, 4096, 4e9, 3840, nbin=2) == mitigate_size(geom, 4096, 4e9, 3840)   # fits: as it was

def test_mosaic_pointings_share_the_tsys_measured_on_one_of_them():
    """Tsys ('nearest-calibrator'): a field with its own measurement uses it; a mosaic's
    other pointings (same name) use their source's; other fields the phase calibrator's."""
    ctx = {"fields": [{"id": 0, "name": "J1924", "intents": ["BANDPASS"]},
                      {"id": 1, "name": "J1832", "intents": ["PHASE"]},
                      {"id": 2, "name": "J1820", "intents": ["CHECK"]}] +
                     [{"id": i, "name": "Target", "intents": ["TARGET"]} for i in (3, 4, 5)]}
    got = field_map(ctx, "nearest-calibrator", {0, 1, 3})
    assert got == {0: [0], 1: [1], 2: [1], 3: [3], 4: [3], 5: [3]}


def test_every_stage_of_every_recipe_is_on_by_topic_and_by_task(tmp_path):
    """The WebLog's By Topic page takes each stage's topic from its registration
    (stages.base.stage): a stage added to a recipe cannot be missing there (as
    fluxcalflag, spwphaseup, gainflag and flagtargets were from the old hand-kept list).
    The pages are rendered and read back."""
    from almapipe import recipes
    from almapipe.report import weblog
    for name in recipes.available():
        stages = [s["stage"] for s in recipes.load(name)["stages"]]
        ctx = {"run_id": "r", "recipe": recipes.load(name), "input_key": "in", "flags": {}, "fields": [],
               "stage_results": [{"index": i, "name": s, "service": "x", "qa_score": 1.0, "qa_reasons": [],
                                  "duration_s": 0.0} for i, s in enumerate(stages)]}
        out = tmp_path / name
        out.mkdir()
        weblog.render(ctx, str(out), {})
        topic_html, task_html = (out / "by_topic.html").read_text(), (out / "by_task.html").read_text()
        for i, s in enumerate(stages):
            assert f"stage{i}.html" in topic_html and f"stage{i}.html" in task_html, (name, s)
        on_topic = [s["name"] for _, items in weblog.by_topic(ctx["stage_results"]) for s in items]
        assert sorted(on_topic) == sorted(stages), name


def test_channel_correlation_of_alma_spectral_setups():
    """Each of ALMA's online averagings (N = 1-16 after the Hanning window) is recognised
    from EFFECTIVE_BW / CHAN_WIDTH, its window's noise bandwidth is that ratio, and its
    neighbours' correlation is the window's; anything else is independent, and the
    WebLog's note says which."""
    from almapipe.heuristics.spectral_response import (EBW_RATIO_OF_ONLINE_AVERAGING, channel_correlation,
                                                        channel_noise_note, mean_variance_factor,
                                                        noise_from_differences, online_averaging)
    for n, ratio in EBW_RATIO_OF_ONLINE_AVERAGING.items():
        assert online_averaging(-1e6, ratio * 1e6) == n                     # a lower sideband too
        rho = channel_correlation(1e6, ratio * 1e6)
        assert 1 + 2 * rho.sum() == pytest.approx(ratio, rel=1e-3)          # a wide sum's variance
        assert mean_variance_factor(np.arange(4000), rho) == pytest.approx(ratio, rel=2e-3)
    assert np.allclose(channel_correlation(1e6, 2.667e6), [2 / 3, 1 / 6])
    assert channel_correlation(1e6, 1.6e6) == pytest.approx([0.3])
    for ebw in (1e6, 2.0e6, None, 0.0):
        assert not len(channel_correlation(1e6, ebw)) and noise_from_differences(np.arange(9), np.zeros(0)) == 1
    rho = channel_correlation(1e6, 2.667e6)
    assert noise_from_differences([7], rho) == pytest.approx(np.sqrt(3))             # one channel
    assert noise_from_differences([6, 7], rho) == pytest.approx(np.sqrt(5))          # a binned plane
    assert mean_variance_factor([3, 5], rho) == pytest.approx(1 + 1 / 6)             # a gap between
    assert mean_variance_factor(np.array([False, True, True]), rho) == pytest.approx(5 / 3)   # a mask
    assert "correlated by 0.67" in channel_noise_note(5, 1e6, 2.667e6)
    assert "none of ALMA's" in channel_noise_note(5, 1e6, 2.0e6)
    assert channel_noise_note(5, 1e6, 1e6) is None
