"""Solar system flux calibrators: the disk model against hand-computed values, the
ephemeris table, the solvers with a resolved model, and an EB whose flux calibrator
is Ganymede (preset 'sso') through the stack: the phase calibrator's flux from
fluxscale within 2 % of the injected truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import j1

from almapipe.calibration import solar_system as ss
from almapipe.calibration.terms import SolveSpec, point_model, solve_term
from almapipe.stages.alma import line_channels
from almapipe.stages.calibration import flux_function
from conftest import simulate
from test_alma import pool_simulated_eb

H, K, C = 6.62607015e-34, 1.380649e-23, 299792458.0


def test_flux_density_is_planck_brightness_less_the_background_times_the_disk():
    tb, nu, theta = 100.0, 230e9, 1.0                        # K, Hz, arcsec
    omega = np.pi * (theta / 206264.80624709636 / 2) ** 2
    bright = 2 * H * nu ** 3 / C ** 2 * (1 / np.expm1(H * nu / (K * tb)) - 1 / np.expm1(H * nu / (K * 2.725)))
    assert ss.disk_flux(tb, nu, theta) == pytest.approx(bright * omega * 1e26, rel=1e-7)
    # 3 % below Rayleigh-Jeans 2 k (Tb - T_cmb) nu^2 / c^2 at 230 GHz: Tb less h nu / 2k
    # (5.5 K), the background's Planck brightness far below its 2.7 K
    rj = 2 * K * (tb - 2.725) * nu ** 2 / C ** 2 * omega * 1e26
    assert 0.96 < ss.disk_flux(tb, nu, theta) / rj < 0.98
    # a body: Titan's flux from its Tb and radius at 9.5 AU
    d = ss.angular_diameter_arcsec(2575.5, 9.5)
    assert d == pytest.approx(2 * 2575.5e3 / (9.5 * 1.495978707e11) * 206264.80624709636, rel=1e-6)
    m = ss.DiskModel("titan", d)
    assert m(np.array([232.320899e9]))[0] == pytest.approx(ss.disk_flux(76.04, 232.320899e9, d), rel=1e-9)


def test_disk_visibility_uniform_and_limb_darkened():
    theta = 1.5                                             # arcsec
    rad = theta / 206264.80624709636
    q = 2.0 / (np.pi * rad)                                 # x = pi theta q = 2
    assert ss.disk_visibility(q, theta) == pytest.approx(2 * j1(2.0) / 2.0, rel=1e-9)        # 0.5767
    assert ss.disk_visibility(0.0, theta) == 1.0
    assert abs(ss.disk_visibility(3.831706 / (np.pi * rad), theta)) < 1e-6                    # first null
    # n = 2: I ~ 1 - r^2/R^2, V = Gamma(3) (2/x)^2 J2(x) = 2 J2(2) at x = 2
    assert ss.disk_visibility(q, theta, 2.0) == pytest.approx(0.7056681, rel=1e-6)
    q_cut = ss.uv_limit(theta)
    assert ss.disk_visibility(q_cut, theta) == pytest.approx(0.1, abs=2e-3)
    assert q_cut < 3.831706 / (np.pi * rad)


def test_body_names_models_and_geometry():
    assert ss.body_name("TITAN") == "titan" and ss.body_name("Titan_1") == "titan"
    assert ss.body_name("J1924-2914") is None and ss.body_name("Iota") is None
    assert ss.mean_radius_km((25559.0, 25559.0, 24973.0), 90.0) == pytest.approx(25559.0)   # pole-on
    assert ss.mean_radius_km((25559.0, 25559.0, 24973.0), 0.0) == pytest.approx(np.sqrt(25559.0 * 24973.0))
    with pytest.raises(ValueError, match="Uranus.*covers 60-1001.3 GHz"):
        ss.brightness_temperature("uranus", np.array([40e9]))   # Butler's Uranus from 60 GHz only
    # planets from astropy; a moon without an ephemeris table is an error saying what is needed
    assert 19 < ss.astropy_distance_au("uranus", 61161.0) < 22
    with pytest.raises(ValueError, match="Ganymede.*ephemeris table"):
        ss.body_geometry("ganymede", 61161.0, None)


# Points of Butler's 2012 tables (<Body>_Tb.dat as distributed with CASA's data), facts
# read off the files: (frequency GHz, Tb K).
BUTLER_POINTS = {"ganymede": [(217.04, 94.7), (237.66, 95.7)],
                 "uranus": [(227.8, 97.18), (230.8, 97.07)],
                 "neptune": [(230.0, 81.4974), (233.0, 89.1586)],    # in the wing of CO(2-1)
                 "titan": [(230.537986, 253.86), (232.320899, 76.04)],   # the core of CO(2-1), continuum
                 "ceres": [(29.22, 185.0), (1009.59, 185.0)]}


def test_butler_2012_tables_reproduced_at_their_points_and_interpolated_between():
    for body, pts in BUTLER_POINTS.items():
        f = np.array([p[0] for p in pts]) * 1e9
        assert ss.brightness_temperature(body, f) == pytest.approx([p[1] for p in pts], abs=1e-9), body
    # linear in frequency between neighbouring points
    (f0, t0), (f1, t1) = BUTLER_POINTS["ganymede"]
    f = f0 + 0.3 * (f1 - f0)
    assert ss.brightness_temperature("ganymede", f * 1e9) == pytest.approx(t0 + 0.3 * (t1 - t0), abs=1e-9)
    assert ss.brightness_temperature("uranus", 229.3e9) == pytest.approx((97.18 + 97.07) / 2, abs=1e-9)
    # the flux follows: Planck excess of the table's Tb times the disk
    d = 1.3
    assert ss.DiskModel("ganymede", d)(np.array([217.04e9]))[0] == pytest.approx(ss.disk_flux(94.7, 217.04e9, d))
    # out of a body's table: an error naming the body and the range
    with pytest.raises(ValueError, match="Titan.*covers 53.287-1000.74 GHz"):
        ss.brightness_temperature("titan", np.array([40e9, 45e9]))        # Band 1: below Butler's Titan
    with pytest.raises(ValueError, match="Ganymede.*covers 29.46-1015.51 GHz"):
        ss.DiskModel("ganymede", 1.3)(np.array([1100e9]))


def test_mars_brightness_temperature_varies_with_time():
    # Mars_Tb.dat rows 2010-01-01 00 h (MJD 55197.0) and 02 h: Tb at 230 GHz 204.9 K, at 330 and
    # 360 GHz 208.0 and 208.7 K at 02 h; its 01 h row (not kept: every 2nd row is) has 204.8 K
    assert ss.brightness_temperature("mars", 230e9, 55197.0) == pytest.approx(204.9, abs=1e-9)
    assert ss.brightness_temperature("mars", 345e9, 55197.08333) == pytest.approx(208.35, abs=1e-9)
    assert ss.brightness_temperature("mars", 230e9, 55197.0 + 1 / 24) == pytest.approx(204.8, abs=0.15)
    # the model follows the time: Tb ranges over ~178-240 K across 2010-2020
    tb = [float(ss.brightness_temperature("mars", 230e9, m)) for m in np.arange(55197.0, 59214.0, 50.0)]
    assert 175 < min(tb) and max(tb) < 245 and max(tb) - min(tb) > 10
    assert ss.DiskModel("mars", 5.0, mjd=55197.0)(np.array([230e9]))[0] == \
        pytest.approx(ss.disk_flux(204.9, 230e9, 5.0))
    with pytest.raises(ValueError, match="Mars.*MJD of the observation is needed"):
        ss.DiskModel("mars", 5.0)(np.array([230e9]))
    with pytest.raises(ValueError, match="Mars.*covers MJD 55197.00-59214.96.*not MJD 61161"):
        ss.brightness_temperature("mars", 230e9, 61161.2)
    with pytest.raises(ValueError, match="Mars.*covers 30-1000 GHz"):
        ss.brightness_temperature("mars", 20e9, 56000.0)


def test_fluxcalflag_table_covers_the_bodies_with_lines():
    freq = np.linspace(229.5e9, 231.5e9, 200)
    assert line_channels("Titan_1", freq).any() and line_channels("URANUS", freq).any()
    assert not line_channels("Ganymede", freq).any()


def _disk_vis(diameter, body="ganymede", seed=3, baseline_m=150.0):
    """Visibilities of a disk through known gains at 229 GHz (baselines up to ~3 baseline_m)."""
    rng = np.random.default_rng(seed)
    nant = 8
    g = (1 + 0.2 * rng.normal(size=(1, nant, 2))) * np.exp(1j * rng.normal(size=(10, nant, 2)))
    g[:, 0] = np.abs(g[:, 0])
    model = ss.DiskModel(body, diameter)
    vis = simulate(nant=nant, ntime=10, nchan=8, gains=g, noise=0.002, freq0=229e9, dfreq=50e6,
                   baseline_m=baseline_m)
    q = np.hypot(vis.uvw[:, 0], vis.uvw[:, 1])[:, None] * vis.freq[None, :] / C
    vis.data = (vis.data * (model(vis.freq)[None, :] * ss.disk_visibility(q, diameter))[:, :, None]).astype(np.complex64)
    return vis, g, model, q


def test_gains_solved_with_the_disk_model_and_not_with_a_point():
    vis, g, model, q = _disk_vis(1.3)
    assert q.max() > 0.3 * model.uv_max_lambda                 # the disk is partly resolved
    sol = solve_term(vis, point_model(vis, {0: model}), SolveSpec(kind="G", solint="int", refant=0))
    amp = np.abs(sol.cparam[:, 0, :]).reshape(g.shape)
    assert np.abs(amp / np.abs(g) - 1).max() < 0.01
    point = solve_term(vis, point_model(vis, {0: lambda f: model(f)}), SolveSpec(kind="G", solint="int", refant=0))
    assert np.median(np.abs(point.cparam[:, 0, :]).reshape(g.shape) / np.abs(g)) < 0.95   # the point is wrong


def test_baselines_that_resolve_the_disk_out_are_left_out():
    vis, g, model, q = _disk_vis(3.5, body="uranus", baseline_m=50.0)
    m = point_model(vis, {0: model})
    beyond = q > model.uv_max_lambda
    assert beyond.any() and (~beyond).any()
    assert np.all(m[beyond] == 0) and np.all(m[~beyond] > 0.1 * model(vis.freq)[None, :].repeat(len(q), 0)[~beyond])
    sol = solve_term(vis, m, SolveSpec(kind="G", solint="int", refant=0, minblperant=2))
    ok = ~sol.flag[:, 0, :].reshape(g.shape)
    amp = np.abs(sol.cparam[:, 0, :]).reshape(g.shape)
    assert ok.mean() > 0.5 and np.abs(amp[ok] / np.abs(g)[ok] - 1).max() < 0.02


def test_ephemeris_table_of_the_simulated_eb(tmp_path):
    from almapipe.simulate.simulator import SimConfig, Simulator
    sim = Simulator(SimConfig.preset("sso", nchan=8))
    res = sim.write(str(tmp_path / "eb"))
    import json
    truth = json.load(open(res["truth"]))["flux_calibrator"]
    fid = truth["field_id"]
    eph = ss.field_ephemeris(res["ms"], fid)
    assert eph is not None and eph.name == "Ganymede" and eph.radii_km == (2631.2, 2631.2, 2631.2)
    assert ss.field_ephemeris(res["ms"], 0) is None
    geo = ss.body_geometry("ganymede", sim.t0 / 86400, eph)
    assert geo["distance_au"] == pytest.approx(truth["distance_au"], rel=1e-6)
    assert geo["diameter_arcsec"] == pytest.approx(truth["diameter_arcsec"], rel=1e-6)
    with pytest.raises(ValueError, match="outside"):
        eph.at(eph.mjd[0] - 1)
    # setjy's model entry gives back the injected flux per spw
    fn = flux_function({"kind": "ssbody", "body": "ganymede", "diameter_arcsec": geo["diameter_arcsec"]})
    for spw, flux in truth["flux_jy_per_spw"].items():
        assert fn(np.array([sim.spw_centres[sim.science_index(int(spw))]]))[0] == pytest.approx(flux, rel=1e-6)


# ------------------------------------------------------------------ through the stack

# the tests look at the flux scale only: imaging cut to the target's continuum per spw
SSO_IMAGING = {"makeimages.calibrators": "false", "makeimages.target_cube": "false",
               "makeimages.target_aggregate": "false"}
pool_simulated_eb("sso_run:sso", "sso", SSO_IMAGING)
pool_simulated_eb("sso_run:sso-uranus", "sso-uranus", SSO_IMAGING)


@pytest.fixture(scope="module", params=[pytest.param("sso", marks=pytest.mark.slow), "sso-uranus"])
def sso_run(request, run_pool):
    """The same run as test_alma's, with Ganymede (partly resolved) or Uranus (resolved
    out on half the baselines, which the solves leave out) as the flux calibrator, from
    the suite's run pool. Ganymede's run is in the slow suite: Uranus's takes every path
    it takes and the resolved-out cut besides, and the default run keeps to CI's 15 minutes."""
    return run_pool.result(f"sso_run:{request.param}")


def test_sso_flux_calibrator_phase_calibrator_flux_within_2pct(sso_run):
    from almapipe.v1 import pipeline_pb2 as pb
    sim, truth, run, summary, _ = sso_run
    assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
    (setjy,) = [s for s in summary["stages"] if s["name"] == "setjy"]
    body = truth["flux_calibrator"]["body"]
    assert any("Butler-JPL-Horizons 2012" in r for r in setjy["qa_reasons"]), setjy
    assert any(f"EPHEM0_{body}" in r for r in setjy["qa_reasons"]), setjy
    cut = [r for r in setjy["qa_reasons"] if "not used in the solves" in r]
    assert bool(cut) == (body == "Uranus"), setjy       # Ganymede is not resolved out anywhere
    c = sim.cfg
    phase = [f for f in summary["fluxscale"] if f["field"] == "J1832-2039"]
    assert len(phase) == c.nspw
    for f in phase:
        nu = float(np.mean(sim.freqs[sim.science_index(f["spw"])]))
        true = c.phase_flux_jy * (nu / c.band_centre_hz) ** c.phase_spix
        print(f"{body}: J1832-2039 spw {f['spw']}: {f['flux_jy']:.4f} +- {f['flux_err_jy']:.4f} Jy, truth {true:.4f} Jy, "
              f"ratio {f['flux_jy'] / true:.4f}")
        assert abs(f["flux_jy"] / true - 1) < 0.02, (f, true)


@pytest.mark.skipif(not __import__("os").environ.get("ALMAPIPE_CASA_PYTHON"),
                    reason="CASA is never a dependency: set ALMAPIPE_CASA_PYTHON to a Python with casatasks")
def test_disk_model_visibilities_agree_with_casa_setjy_butler_2012(tmp_path):
    """On the simulated Ganymede EB, CASA's setjy (standard 'Butler-JPL-Horizons 2012', the
    field's ephemeris table) writes MODEL_DATA that our disk model reproduces within 1 %
    on every baseline and channel (measured: 0.22 % below CASA's, 0.08-0.26 %)."""
    import os
    import shutil
    import subprocess
    import casacore.tables as ct
    from almapipe.simulate.simulator import simulate
    res = simulate(str(tmp_path / "eb"), "sso", target_scans=1)
    truth = json.load(open(res["truth"]))
    fid, body = truth["flux_calibrator"]["field_id"], truth["flux_calibrator"]["body"]
    spws = truth["science_spws"]
    ms = str(tmp_path / "casa.ms")
    shutil.copytree(res["ms"], ms)
    script = (f"from casatasks import setjy\nsetjy(vis={ms!r}, field={body!r}, spw={','.join(map(str, spws))!r}, "
              f"standard='Butler-JPL-Horizons 2012', usescratch=True)\n")
    subprocess.run([os.environ["ALMAPIPE_CASA_PYTHON"], "-c", script], check=True, cwd=tmp_path,
                   capture_output=True, timeout=900)
    eph = ss.field_ephemeris(ms, fid)
    with ct.table(ms, ack=False) as t:
        for spw in spws:
            sel = t.query(f"DATA_DESC_ID=={spw} AND FIELD_ID=={fid} AND ANTENNA1!=ANTENNA2")
            casa, uvw, time = np.abs(sel.getcol("MODEL_DATA")[:, :, 0]), sel.getcol("UVW"), sel.getcol("TIME")
            freq = ct.table(f"{ms}/SPECTRAL_WINDOW", ack=False).getcell("CHAN_FREQ", spw)
            geo = ss.body_geometry(body.lower(), float(np.mean(time)) / 86400, eph)
            disk = ss.DiskModel(body.lower(), geo["diameter_arcsec"], 0.0, 0.0)
            q = np.hypot(uvw[:, 0], uvw[:, 1])[:, None] * freq[None, :] / 299792458.0
            ours = np.abs(disk(freq)[None, :] * ss.disk_visibility(q, geo["diameter_arcsec"], 0.0))
            assert np.abs(ours / casa - 1).max() < 0.01, (spw, np.median(ours / casa))
