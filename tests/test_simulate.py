"""The ALMA simulator: structure of the EB it writes, and consistency with its truth."""
import csv
import json
import os

import casacore.tables as ct
import numpy as np
import pytest

from almapipe.msio import listobs, ms as msio
from almapipe.simulate.alma_pads import ALMA_C8_PADS
from almapipe.simulate.simulator import SimConfig, Simulator
from almapipe.heuristics.flagging import shadow_mask


@pytest.fixture(scope="module")
def eb(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim"))
    sim = Simulator(SimConfig.preset("small"))
    res = sim.write(out)
    return sim, res, json.load(open(res["truth"])), np.load(os.path.join(out, "truth.npz"))


def test_eb_is_an_ms_with_alma_intents_and_scan_sequence(eb):
    _, res, truth, _ = eb
    msio.check_ms(res["ms"])
    obs = listobs.summary(res["ms"])
    assert obs["telescope"] == "ALMA" and obs["corr_types"] == ["XX", "YY"]
    # directions in ICRS, as importasdm labels ALMA's; no SOURCE lines (images: band centre)
    assert obs["direction_frame"] == "ICRS" and all(f["rest_freq_hz"] is None for f in obs["fields"])
    roles = {f["name"]: f["intents"] for f in listobs.assign_roles(obs, None)}
    assert roles["J1924-2914"] == ["ATMOSPHERE", "BANDPASS", "FLUX", "WVR"] and roles["Target"] == ["ATMOSPHERE", "TARGET", "WVR"]
    assert "CHECK" in roles["J1820-2528"] and "PHASE" in roles["J1832-2039"]
    seq = [(s["field"], s["intents"][0]) for s in obs["scans"]]
    assert seq[:5] == [("J1924-2914", "ATMOSPHERE"), ("J1924-2914", "BANDPASS"), ("J1832-2039", "ATMOSPHERE"),
                       ("Target", "ATMOSPHERE"), ("J1832-2039", "PHASE")]
    assert sum(1 for s in seq if s == ("Target", "TARGET")) == 3 and seq[-1] == ("J1832-2039", "ATMOSPHERE")


def test_spectral_windows_as_importasdm_writes_them(eb):
    """The WVR spw first (4 channels, one correlation, auto-correlations), then per
    baseband a Tsys spw and its channel average, then the science spws and theirs; the
    lower-sideband science spw runs down in frequency; ATMOSPHERE scans have data in the
    Tsys spws only. The pipeline's classification finds each kind."""
    sim, res, truth, _ = eb
    obs = listobs.summary(res["ms"])
    kinds = {s["id"]: s["kind"] for s in obs["spws"]}
    assert kinds == {0: "wvr", 1: "tsys", 2: "chavg", 3: "tsys", 4: "chavg", 5: "science", 6: "chavg",
                     7: "science", 8: "chavg"}
    assert obs["science_spws"] == truth["science_spws"] == [5, 7]
    lsb = msio.spw_table(res["ms"])[5]
    assert truth["lsb_spws"] == [5] and lsb["chan_width_hz"] < 0 and np.all(np.diff(lsb["chan_freq_hz"]) < 0)
    assert lsb["name"].endswith("#BB_1#SW-01#FULL_RES") and lsb["baseband"] == 1
    assert msio.corr_types_of_spw(res["ms"], 0) == ["XX"] and msio.corr_types_of_spw(res["ms"], 5) == ["XX", "YY"]
    for sc in obs["scans"]:
        if sc["intents"] == ["ATMOSPHERE", "WVR"]:
            assert set(sc["spws"]) == {1, 2, 3, 4}
        else:
            assert set(sc["spws"]) == {0, 5, 6, 7, 8}
    with ct.table(res["ms"], ack=False) as t:
        wvr = t.query("DATA_DESC_ID == 0")
        assert (wvr.getcol("ANTENNA1") == wvr.getcol("ANTENNA2")).all() and wvr.getcol("DATA").shape[1:] == (4, 1)


def test_syscal_tsys_spectra_and_spw_map(eb):
    sim, res, truth, _ = eb
    with ct.table(os.path.join(res["ms"], "SYSCAL"), ack=False) as t:
        tsys = t.getcol("TSYS_SPECTRUM")
        spw = t.getcol("SPECTRAL_WINDOW_ID")
    assert tsys.shape[1:] == (128, 2) and set(spw) == {1, 3}
    assert 50 < np.median(tsys) < 250
    last = tsys[spw == 3].mean(axis=(0, 2))                  # upper sideband: ascending
    assert last[-10:].mean() > 1.5 * last[:10].mean()      # the atmospheric line near the top of the last spw
    assert truth["tsys_spw_map"] == {"1": 5, "3": 7}
    from almapipe.stages.alma import tsys_spw_map
    assert tsys_spw_map(res["ms"], 5, [1, 3]) == 1 and tsys_spw_map(res["ms"], 7, [1, 3]) == 3


def test_wvr_brightness_tracks_the_injected_path(eb):
    """The WVR spw's auto-correlations, read as wvrgcal reads them, follow the path."""
    from almapipe.stages.alma import read_wvr
    sim, res, truth, arrays = eb
    times, _, tb = read_wvr(res["ms"], truth["wvr_spw"])
    np.testing.assert_allclose(times, arrays["wvr_times"])
    path = arrays["path_mm"]
    dead = truth["antennas"].index(truth["dead_antenna"])
    good = np.arange(tb.shape[1]) != dead
    est = (tb[:, good, 0] - tb[:, good, 0].mean()) / truth["wvr_dTdL_K_per_mm"][0]
    assert np.corrcoef(est.ravel(), (path[:, good] - path[:, good].mean()).ravel())[0, 1] > 0.99


def test_antennapos_csv_lists_the_position_errors(eb):
    _, res, truth, _ = eb
    rows = list(csv.DictReader(open(res["antennapos"])))
    assert {r["antenna"] for r in rows} == set(truth["position_errors_m"])
    for r in rows:
        np.testing.assert_allclose([float(r[k]) for k in ("xoffset_m", "yoffset_m", "zoffset_m")],
                                   truth["position_errors_m"][r["antenna"]], atol=1e-6)


def test_noise_follows_the_radiometer_equation(eb):
    """Baselines to the dead antenna carry noise only: sigma = 1/sqrt(2 dnu tau) per
    component, dnu the effective bandwidth (8/3 of a channel's width: the correlator's
    Hanning window, as ALMA's), neighbouring channels correlated by 2/3 and channels two
    apart by 1/6; the importer reads the effective bandwidth that says so."""
    from almapipe.heuristics.spectral_response import channel_correlation
    sim, res, truth, _ = eb
    vis = msio.read_vis(res["ms"], 5)
    dead = truth["antennas"].index(truth["dead_antenna"])
    rows = ((vis.ant1 == dead) | (vis.ant2 == dead)) & (vis.ant1 != vis.ant2)
    shadowed = shadow_mask(vis.time, vis.ant1, vis.ant2, vis.uvw, np.full(sim.cfg.nant, 12.0))[rows]
    bad = {c for sp, c in sim.bad_channels if sim.science_spw_ids[sp] == 5}     # the injected spikes
    d = vis.data[rows][~shadowed].real
    (info,) = [s for s in msio.spw_table(res["ms"]) if s["id"] == 5]
    assert info["effective_bw_hz"] == pytest.approx(8 / 3 * abs(info["chan_width_hz"]))
    expected = 1 / np.sqrt(2 * info["effective_bw_hz"] * sim.cfg.integration_s) / np.sqrt(2)
    assert abs(np.std(np.delete(d, sorted(bad), axis=1)) / expected - 1) < 0.05
    for k, want in ((1, 2 / 3), (2, 1 / 6)):
        pairs = [c for c in range(d.shape[1] - k) if not {c, c + k} & bad]
        got = np.mean([np.corrcoef(d[:, c].ravel(), d[:, c + k].ravel())[0, 1] for c in pairs])
        assert abs(got - want) < 0.05, (k, got)
    assert np.allclose(channel_correlation(info["chan_width_hz"], info["effective_bw_hz"]), [2 / 3, 1 / 6], atol=1e-3)


def test_shadowing_is_present_and_found_by_flagdata(eb):
    sim, res, truth, _ = eb
    assert 0 < truth["shadowed_rows_per_spw"] * sim.cfg.nspw < 0.05 * truth["rows"]
    vis = msio.read_vis(res["ms"], 5)
    mask = shadow_mask(vis.time, vis.ant1, vis.ant2, vis.uvw, np.full(sim.cfg.nant, 12.0))
    assert mask.sum() == truth["shadowed_rows_per_spw"]


def test_realistic_preset_is_the_one_the_issue_describes():
    cfg = SimConfig.preset("realistic")
    assert (cfg.nant, cfg.nspw, cfg.nchan, cfg.integration_s, cfg.spw_width_hz) == (43, 4, 128, 6.0, 1.875e9)
    sim = Simulator(cfg)
    assert len(set(sim.pads)) == 43 and 3300 < sum(p[2] for p in sim.scan_plan()) < 4500   # about an hour
    with pytest.raises(ValueError, match="unknown preset"):
        SimConfig.preset("huge")


def test_online_flags_in_flag_cmd_name_the_off_source_antenna(eb):
    """FLAG_CMD holds the online flag as a flagdata command; inside its time range the
    antenna's cross-correlations carry noise only."""
    from almapipe.heuristics.flagging import parse_template, parse_timerange
    sim, res, truth, _ = eb
    (row,) = msio.online_flag_commands(res["ms"])
    assert row["type"] == "ONLINE" and row["reason"] == "ANTENNA_NOT_ON_SOURCE"
    (cmd,) = parse_template(row["command"])
    (online,) = truth["online_flags"]
    assert cmd["antenna"].startswith(online["antenna"])
    ((lo, hi),) = parse_timerange(cmd["timerange"], online["start_mjd_s"])
    assert abs(lo - online["start_mjd_s"]) < 1e-3 and abs(hi - online["end_mjd_s"]) < 1e-3
    vis = msio.read_vis(res["ms"], 5, field_ids=[1])
    a = truth["antennas"].index(online["antenna"])
    inside = (vis.time >= lo) & (vis.time <= hi) & (vis.ant1 != vis.ant2)
    mine = inside & ((vis.ant1 == a) | (vis.ant2 == a))
    others = inside & (vis.ant1 != a) & (vis.ant2 != a)
    assert np.abs(vis.data[mine].mean(axis=1)).mean() < 0.2 * np.abs(vis.data[others].mean(axis=1)).mean()


def test_mixed_preset_has_a_narrow_spw_with_its_own_phase_offsets(tmp_path):
    sim = Simulator(SimConfig.preset("mixed", target_scans=1, nant=4))
    res = sim.write(str(tmp_path))
    spws = msio.spw_table(res["ms"])
    widths = [abs(spws[i]["chan_width_hz"]) * spws[i]["nchan"] for i in sim.science_spw_ids]
    assert widths == pytest.approx([1.875e9, 1.875e9, 0.1171875e9])
    t = np.load(tmp_path / "truth.npz")
    assert np.all(t["spw_phase_rad"][0] == 0) and np.std(t["spw_phase_rad"][1:]) > 0.3


def test_long_baseline_preset_has_km_baselines_and_an_fdm_spw(tmp_path):
    """Preset 'longbaseline': antennas on ALMA's C-8 pads and FDM science spws of 3840
    channels; written here at a reduced size (5 antennas, 480 channels, one short
    target scan), its baselines reach kilometres and its spws have the channels asked."""
    full = SimConfig.preset("longbaseline")
    assert full.configuration == "C8" and full.nchan == 3840 and full.spw_width_hz / full.nchan == 488281.25
    sim = Simulator(SimConfig.preset("longbaseline", nant=5, nchan=480, target_scans=1, target_scan_s=24.0,
                                     bandpass_scan_s=24.0, phase_scan_s=12.0, check_scan_s=12.0, dead_antenna=False))
    res = sim.write(str(tmp_path))
    truth = json.load(open(res["truth"]))
    for sid in truth["science_spws"]:
        spw = next(s for s in truth["spws"] if s["id"] == sid)
        assert spw["nchan"] == 480 and abs(abs(spw["chan_width_hz"]) - 1.875e9 / 480) < 1
    with ct.table(res["ms"], ack=False) as t:
        uvw = t.getcol("UVW")
        cross = t.getcol("ANTENNA1") != t.getcol("ANTENNA2")
    length = np.hypot(uvw[cross, 0], uvw[cross, 1])
    assert length.max() > 3000.0 and np.median(length) > 1000.0       # km-scale, not C-1's 160 m
    with ct.table(os.path.join(res["ms"], "ANTENNA"), ack=False) as t:
        assert set(t.getcol("STATION")) <= {p[0] for p in ALMA_C8_PADS}
