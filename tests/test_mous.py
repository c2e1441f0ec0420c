"""A whole MOUS per run: three simulated EBs of one target on different days and hour
angles, one with its flux scale 5 % off (its flux calibrator's catalogue flux is wrong),
calibrated each in a run of its own and imaged together (issue: per-EB phase
calibrator fluxes and the disagreeing EB reported; after equalization all within 1 %;
the combined continuum rms about 1/sqrt(3) of one EB's; source fluxes within 5 %)."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from almapipe.cli import download_products, upload_input
from almapipe.simulate.simulator import SimConfig, Simulator
from almapipe.v1 import pipeline_pb2 as pb
from runpool import pooled
from test_system import stub, wait_run  # noqa: F401  (the gRPC stub fixture)

# three EBs: days apart, starting at different hour angles (rising through these
# elevations), each with its own noise, gains and atmosphere; the second's flux.csv 5 % high
EBS = [dict(seed=11, date="2026-05-01", start_elevation_deg=48.0),
       dict(seed=12, date="2026-05-03", start_elevation_deg=55.0, catalogue_flux_error=0.05),
       dict(seed=13, date="2026-05-07", start_elevation_deg=62.0)]
# the tests look at the aggregate continuum and the cubes: no per-spw continuum images
PARAMS = {"fluxconsistency.equalize": "true",
          "makeimages.calibrators": "false",
          "makeimages.target_cont": "false",
          "makeimages.cube": json.dumps({"robust": 0.5, "niter": 100, "nsigma": 3.0})}
# the single EB's run is there for its aggregate's noise only
SINGLE_PARAMS = dict(PARAMS, **{"makeimages.target_cube": "false"})
MOUS_ID = "uid://A001/X3c7/X1a"


def write_eb(d, i: int, overrides: dict) -> tuple:
    # a 10 mJy continuum source: bright enough for its flux, faint enough that the
    # images' noise, not the array's deconvolution and phase-transfer errors around a
    # bright source (which scale with its flux), sets their rms
    sim = Simulator(SimConfig.preset("small", target_cont_jy=0.01, **overrides))
    res = sim.write(str(d / f"eb{i}"))
    tar = str(d / f"eb{i}.tar")
    with tarfile.open(tar, "w") as t:       # the MS with antennapos.csv and flux.csv beside it
        t.add(res["ms"], arcname=f"eb{i}.ms")
        for path in (res["antennapos"], res["flux_csv"]):
            t.add(path, arcname=os.path.basename(path))
    return sim, tar


@pooled("mous")
def submit_mous(stack, stub, d):  # noqa: F811
    """The three EBs as one MOUS run, and the first alone imaged as the MOUS is (for the
    noise it reaches on its own); submitted with the suite's other long runs
    (tests/runpool.py)."""
    _, cfg = stack
    ebs = [write_eb(d, i + 1, o) for i, o in enumerate(EBS)]
    keys = [upload_input(cfg, tar) for _, tar in ebs]
    run = stub.SubmitRun(pb.SubmitRunRequest(input_keys=keys, mous_id=MOUS_ID, recipe="alma_calimage",
                                             parameters=PARAMS))
    single = stub.SubmitRun(pb.SubmitRunRequest(input_key=keys[0], recipe="alma_calimage",
                                                parameters=SINGLE_PARAMS))

    def finish():
        done = wait_run(stub, run.run_id, 1200)
        alone = wait_run(stub, single.run_id, 600)
        out, out1 = d / "products", d / "single"
        download_products(stub, pb, done.run_id, str(out))
        download_products(stub, pb, alone.run_id, str(out1))
        return ([s for s, _ in ebs], done, json.load(open(out / "summary.json")), out,
                alone, json.load(open(out1 / "summary.json")))
    return finish


@pytest.fixture(scope="module")
def mous(run_pool):
    return run_pool.result("mous")


def test_each_eb_is_calibrated_in_its_own_run_and_the_mous_run_images_them_together(mous, stub):  # noqa: F811
    sims, run, summary, out, _, _ = mous
    assert run.status == pb.RUN_STATUS_SUCCEEDED, run.error
    assert run.mous_id == MOUS_ID and len(run.eb_run_ids) == 3
    for rid in run.eb_run_ids:
        eb = stub.GetRun(pb.GetRunRequest(run_id=rid))
        assert eb.status == pb.RUN_STATUS_SUCCEEDED and eb.parent_run_id == run.run_id
        assert [s.name for s in eb.stages][-1] == "split"
    assert [s.name for s in run.stages][:3] == ["fluxconsistency", "uvcontsub", "makeimages"]
    assert [e["ms_name"] for e in summary["ebs"]] == ["eb1", "eb2", "eb3"]
    # per-EB results are kept: each EB's fluxscale of the phase and check calibrators
    assert {r["eb"] for r in summary["fluxscale"]} == {"eb1", "eb2", "eb3"}
    home = (out / "qa" / "weblog" / "index.html").read_text()
    assert all(f"eb{i}" in home for i in (1, 2, 3))


def test_the_eb_whose_flux_scale_is_off_is_named_and_equalized(mous):
    sims, run, summary, out, _, _ = mous
    fc = summary["flux_consistency"]
    ratios = {eb: s["ratio"] for eb, s in fc["ebs"].items()}
    # eb2's flux calibrator was given 5 % too bright: its phase calibrator comes out 5 % high
    assert fc["outliers"] == ["eb2"], fc
    assert ratios["eb2"] / np.mean([ratios["eb1"], ratios["eb3"]]) == pytest.approx(1.05, abs=0.015)
    stage = next(s for s in summary["stages"] if s["name"] == "fluxconsistency")
    assert stage["qa_score"] <= 0.6 and any("eb2" in r for r in stage["qa_reasons"])
    # equalized: each EB's phase calibrator fluxes times its factor agree within 1 % in every
    # spw (with each other: a spw's mean_jy is of the fluxes before, weighted by their errors,
    # so eb2's excess pulls it by as much as eb2 weighs there)
    for spw in {row["spw"] for row in fc["table"]}:
        scaled = [row["flux_jy"] * fc["ebs"][row["eb"]]["factor"] for row in fc["table"] if row["spw"] == spw]
        assert len(scaled) == 3 and max(scaled) / min(scaled) - 1 < 0.01, (spw, scaled)
    assert (out / "calibration" / "flux_equalization.csv").exists()


def test_combined_image_recovers_the_source_with_sqrt3_less_noise(mous):
    sims, run, summary, out, single, single_summary = mous
    assert single.status == pb.RUN_STATUS_SUCCEEDED, single.error
    c = sims[0].cfg
    # the mean flux scale of the three EBs is 5/3 % high (one of them 5 %)
    def agg(s):
        (a,) = [i for i in s["images"] if i["field"] == "Target" and i["specmode"] == "cont" and i["aggregate"]]
        return a
    assert abs(agg(summary)["peak_jy_per_beam"] / c.target_cont_jy - 1) < 0.05, agg(summary)
    ratio = agg(summary)["rms_jy_per_beam"] / agg(single_summary)["rms_jy_per_beam"]
    assert abs(ratio * np.sqrt(3) - 1) < 0.15, (ratio, agg(summary), agg(single_summary))
    # the line in the combined cube, each EB's rows on the cube's LSRK grid
    sid = sims[0].science_spw_ids[0]
    (cube,) = [i for i in summary["images"] if i["field"] == "Target" and i["specmode"] == "cube" and i["spw"] == sid]
    f = sims[0].freqs[0]
    line = c.target_line_jy * np.exp(-0.5 * ((f - sims[0].spw_centres[0]) / (0.06 * c.spw_width_hz)) ** 2)
    assert cube["peak_channel"] in np.flatnonzero(line > 0.8 * line.max())
    assert abs(cube["peak_jy_per_beam"] / line.max() - 1) < 0.15, cube


def test_a_failed_eb_fails_the_mous_run_naming_it(stack, stub, tmp_path):  # noqa: F811
    _, cfg = stack
    junk = tmp_path / "eb2.txt"
    junk.write_text("not an execution block\n" * 20)
    _, tar = write_eb(tmp_path, 1, EBS[0])
    keys = [upload_input(cfg, tar), upload_input(cfg, str(junk))]
    run = stub.SubmitRun(pb.SubmitRunRequest(input_keys=keys, mous_id="uid://A001/X1/X2", recipe="alma_calimage"))
    run = wait_run(stub, run.run_id, 300)
    assert run.status == pb.RUN_STATUS_FAILED
    assert "eb2.txt" in run.error and "neither a MeasurementSet" in run.error
    assert all(s.status == pb.STAGE_STATUS_SKIPPED for s in run.stages)


def test_flux_consistency_names_the_eb_off_the_median():
    """Unit level: one EB of three 5 % high is the outlier (against the EBs' median, which
    one wrong EB does not pull); the factors bring every EB to the weighted mean."""
    from almapipe.heuristics.fluxscale import flux_consistency

    def eb(name, scale):
        return {"ms_name": name, "fluxscale": [
            {"field": "J1832-2039", "spw": s, "flux_jy": 0.8 * scale * (1 + 0.01 * k), "flux_err_jy": 0.002, "n": 7}
            for k, s in enumerate((5, 7))] + [{"field": "J1820-2528", "spw": 5, "flux_jy": 0.3, "flux_err_jy": 0.01,
                                              "n": 7}]}
    res = flux_consistency([eb("a", 1.0), eb("b", 1.05), eb("c", 0.995)], {"J1832-2039"})
    assert res["outliers"] == ["b"]
    assert {r["field"] for r in res["table"]} == {"J1832-2039"}          # phase calibrators only
    for r in res["table"]:
        assert r["flux_jy"] * res["ebs"][r["eb"]]["factor"] == pytest.approx(r["mean_jy"], rel=1e-3)
    assert flux_consistency([eb("a", 1.0), eb("b", 1.01)], {"J1832-2039"})["outliers"] == []
