"""Pieces of the calibration record and of the outlier flagging, without the stack:
gainflag and flagtargets against injected bad data, the flags file, and the CASA
applycal calls written for the library's field rules (decision 11). The whole chain,
restore against the pipeline's own applycal, is in test_alma.py."""
from __future__ import annotations

import ast

import numpy as np
import pytest

from almapipe.calibration import restore
from almapipe.calibration.terms import SolveSpec, solve_term
from almapipe.stages.calpackage import CASA_SCRIPT
from almapipe.heuristics.outliers import gain_outliers, uv_outliers
from conftest import simulate


def _gains(nant=8, ntime=30, seed=3, amp_rms=0.1):
    rng = np.random.default_rng(seed)
    amp = (1 + amp_rms * rng.normal(size=(1, nant, 1))) * (1 + 0.01 * rng.normal(size=(ntime, nant, 2)))
    return amp * np.exp(1j * rng.uniform(-np.pi, np.pi, (ntime, nant, 2)))


def _solve(g, noise=0.02):
    vis = simulate(nant=g.shape[1], ntime=g.shape[0], gains=g, noise=noise, flux=1.0)
    return solve_term(vis, np.ones((len(vis.time), len(vis.freq))), SolveSpec(kind="G", solint="int", refant=0))


def test_gainflag_finds_an_antenna_at_a_third_of_its_gain_and_nothing_else():
    g = _gains()
    assert gain_outliers(_solve(g)) == {}                     # 10 % gain differences are normal
    bad = g.copy()
    bad[:, 5] *= 0.3
    out = gain_outliers(_solve(bad))
    assert set(out) == {5} and "median gain" in out[5]


def test_gainflag_finds_an_antenna_whose_gain_jumps_in_time():
    g = _gains()
    rng = np.random.default_rng(9)
    g[:, 2] *= (1 + 0.4 * rng.normal(size=(g.shape[0], 1))).clip(0.2)
    out = gain_outliers(_solve(g))
    assert set(out) == {2} and "scatter" in out[2]


def test_flagtargets_flags_a_burst_on_one_baseline_and_little_else():
    # an extended-ish target: two sources, so amplitude varies with uv distance
    vis = simulate(nant=10, ntime=60, nchan=16, flux=0.05, noise=0.05, offsets=[(0.2, 2e-5, -1e-5)], seed=4)
    data = vis.data.copy()
    burst = (vis.ant1 == 2) & (vis.ant2 == 7) & (vis.time >= vis.time[0] + 200) & (vis.time <= vis.time[0] + 260)
    data[burst] += 3.0                                        # about 50 sigma of the noise
    uvdist = np.hypot(vis.uvw[:, 0], vis.uvw[:, 1])
    out = uv_outliers(np.abs(data), vis.flag, uvdist)
    assert out[burst].all()
    assert out[~burst].mean() < 1e-3, out[~burst].mean()
    # and nothing at all without the burst
    assert uv_outliers(np.abs(vis.data), vis.flag, uvdist).sum() == 0


def test_flags_file_round_trip_and_row_check(tmp_path):
    vis = simulate(nant=5, ntime=7, nchan=9)
    vis.spw = 5
    rng = np.random.default_rng(1)
    vis.flag = rng.random(vis.flag.shape) < 0.2
    path = str(tmp_path / "eb.flags.npz")
    restore.write_flags(path, restore.flag_arrays(vis))
    flag, t, a1, a2 = restore.read_flags(path)[5]
    assert np.array_equal(flag, vis.flag)
    assert restore.rows_match(vis, t, a1, a2) is None
    assert "rows" in restore.rows_match(vis, t[:-1], a1[:-1], a2[:-1])
    a2 = a2.copy()
    a2[3] += 1
    assert "row 3" in restore.rows_match(vis, t, a1, a2)


def _library():
    fields = {"0": "J1924-2914", "1": "J1832-2039", "2": "Target", "3": "J1820-2528"}
    own = {s: {"0": [0], "1": [1], "2": [], "3": [3]} for s in ("5", "7")}
    phase = {s: {"0": [], "1": [], "2": [1], "3": [1]} for s in ("5", "7")}
    tsys = {s: {"0": [0], "1": [1], "2": [1], "3": [3]} for s in ("5", "7")}
    t = lambda name, kind, interp, calwt, fm: {"table": name, "file": f"eb.{name}.tbl", "kind": kind,  # noqa: E731
                                               "interp": interp, "calwt": calwt, "field_map": fm}
    return {"format": restore.CALLIBRARY_FORMAT, "ms_name": "eb", "science_spws": [5, 7], "fields": fields,
            "flags": "eb.flags.npz",
            "tables": [t("tsyscal", "TSYS", "linear", True, tsys),
                       t("bandpass", "B", "nearest", True, {"5": None, "7": None}),
                       t("timegaincal", "G", "linear", True, own),
                       t("timegaincal_transfer", "G", "linear", True, phase)]}


def test_calapply_writes_the_field_rules_as_applycal_calls():
    text = restore.calapply_text(_library())
    calls = [ast.parse(line).body[0].value for line in text.splitlines() if line.startswith("applycal(")]
    kw = [{k.arg: ast.literal_eval(k.value) for k in c.keywords} for c in calls]
    # the bandpass and flux calibrators and the check source: their own gains; the
    # target: the phase calibrator's Tsys and transferred gains; both spws in one call
    by_field = {k["field"]: k for k in kw}
    assert set(by_field) == {"0", "1", "2", "3"}
    assert all(k["spw"] == "5,7" and k["applymode"] == "calflagstrict" for k in kw)
    tgt = by_field["2"]
    assert tgt["gaintable"] == ["eb.tsyscal.tbl", "eb.bandpass.tbl", "eb.timegaincal_transfer.tbl"]
    assert tgt["gainfield"] == ["1", "", "1"]
    assert tgt["interp"] == ["linear,nearestflag", "nearest,nearestflag", "linear"]
    assert tgt["calwt"] == [True, True, True] and tgt["spwmap"] == [[], [], []]
    assert by_field["3"]["gaintable"][-1] == "eb.timegaincal_transfer.tbl"
    assert by_field["3"]["gainfield"] == ["3", "", "3", "1"]
    assert by_field["0"]["gaintable"] == ["eb.tsyscal.tbl", "eb.bandpass.tbl", "eb.timegaincal.tbl"]


def test_calapply_splits_calls_where_spws_differ():
    lib = _library()
    lib["tables"][2]["field_map"]["7"]["3"] = []           # no own gains for the check source in spw 7
    kw = [ln for ln in restore.calapply_text(lib).splitlines() if "field='3'" in ln]
    assert len(kw) == 2 and any("spw='5'" in ln for ln in kw) and any("spw='7'" in ln for ln in kw)


def test_casa_restore_script_is_valid_python():
    compile(CASA_SCRIPT, "casa_restore.py", "exec")
    assert "applycal" in CASA_SCRIPT and "sortlist=\"TIME,ANTENNA1,ANTENNA2\"" in CASA_SCRIPT


def test_restore_names_a_package_without_a_record(tmp_path):
    (tmp_path / "pkg" / "calibration").mkdir(parents=True)
    with pytest.raises(restore.RestoreError, match="callibrary"):
        restore.restore_ms(str(tmp_path / "pkg"), str(tmp_path / "eb.ms"), str(tmp_path / "out"))
