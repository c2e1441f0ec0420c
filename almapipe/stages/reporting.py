"""Reporting stages (weblog service): exportdata and weblog.

The products package is a map from package path (product/..., calibration/...,
qa/..., log/..., script/..., README) to immutable object keys; the gateway
adds summary.json when the run ends and serves the map through ListProducts.
"""
from __future__ import annotations

import json
import os
import tarfile

from .base import QA, Param, Score, StageIO, metric, stage
from .imaging import ous_name
from ..report.qa2 import qa2_section, requested_goals
from .calpackage import calibration_package
from ..msio import storeio
from ..report import weblog as weblog_render
from ..report.images import image_views

README = """almapipe products package
=========================

run id      : {run_id}
OUS         : {ous}
recipe      : {recipe} (version {version})
input       : {input_key}

product/      FITS images named as the ALMA pipeline names them,
              <OUS>.s<stage>_0.<field>_<intent>.spw<N>.<mode>.I.<kind>.fits:
              intent sci (target), bp, ph, flux, ch (check source); mode mfs (one spw),
              cont (the aggregate continuum of spws N = 5_7), cube; kind pbcor, pb,
              mask, and image and residual (not primary-beam corrected)
calibration/  CASA calibration tables (tar archives of the table directories),
              <OUS>.cont.dat, flux.csv, and the antennapos.csv and flag template given;
              <ms>.calapply.txt (how they were applied, as CASA applycal calls),
              <ms>.flags.npz (the final flags), <ms>.callibrary.json: rebuild the
              calibrated MS with `almapipe restore . EB.ms --out DIR` or with
              script/casa_restore.py in CASA
calibrated/   with exportdata's `ms: true`: <ms>.ms.tar, the calibrated MS (DATA,
              CORRECTED_DATA, FLAG, WEIGHT) and <ms>.target.ms.tar, the target fields'
              calibrated data as split makes them (DATA = the calibrated data), exported
              from the visibility store; tar archives of the MS directories
qa/           the WebLog (weblog.tar.gz, open weblog/index.html) and qa_scores.json
log/          the log of every stage
script/       recipe.json: the exact recipe this run executed;
              rerun.sh: reruns it with `almapipe run` (edit recipe.json to tweak it)
summary.json  run status, stage QA scores and durations, fluxes, image statistics
"""

RERUN = """#!/usr/bin/env bash
# Reruns this pipeline run: give the input (MS tar or UVFITS) as the first argument.
# Edit recipe.json beside this script to change parameters; a flag template
# and a cont.dat can be given with --flag-template and --cont-dat.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec almapipe run "${{1:?usage: rerun.sh INPUT [--out DIR]}}" --recipe-file "$here/recipe.json" "${{@:2}}"
"""


@metric("exportdata.calibrated_ms", "ms: whether the calibrated data are in the visibility store to export: 0.8 "
        "when not (no calibrated MS in the package)")
def no_calibrated_ms() -> Score:
    return Score(0.8, "exportdata ms: no calibrated data in the visibility store: no calibrated MS in the package.")


@metric("exportdata.fits_images", "the FITS images in the products package: 0.5 when there are none")
def fits_images(n_fits: int) -> Score | None:
    if not n_fits:
        return Score(0.5, "No FITS images in the products package.")
    return None


@metric("weblog.weight", "the WebLog's weight against its budget (50 MB in all, 5 MB a page with its images): "
        "0.8 over it", unit="bytes")
def weblog_weight(total: int, heaviest_page: int) -> Score | None:
    if total > 50e6 or heaviest_page > 5e6:
        return Score(0.8, "The WebLog is over its weight budget (50 MB in all, 5 MB a page).")
    return None


def calibrated_ms(ctx: dict, io: StageIO, qa: QA) -> dict:
    """The EB's calibrated MS and its split target MS, written from the visibility store
    (storeio.export_ms: the EB's MS shell plus the rows, in row blocks), each as a tar."""
    parts = [p for p in ctx.get("partitions", []) if "arrays" in p]
    if not parts or not all(p.get("calibrated") for p in parts):
        qa.add(no_calibrated_ms())
        return {}
    ms = ctx.get("ms_name", "ms")
    shell = io.fetch_meta(parts[0]["meta"])
    pkg = {}
    for name, group, corrected in ((f"{ms}.ms", parts, True),
                                   (f"{ms}.target.ms", ctx.get("target_partitions") or [], False)):
        if not group:
            continue
        dest = storeio.export_ms(group, shell, os.path.join(io.workdir, name), io.vis, corrected=corrected)
        pkg[f"calibrated/{name}.tar"] = io.put_dir(dest, name)["key"]
        io.log("exported %s from the visibility store (%d partition(s))", name, len(group))
    return pkg


@stage("exportdata", service="weblog", topic="Products", qa=(no_calibrated_ms, fits_images),
       reads=("run_id", "recipe", "input_key", "user", "ms_name", "caltables", "images", "cont_dat_key",
              "partitions", "target_partitions",
              "flux_csv_key", "flux_consistency", "ebs", "stage_results", "mous_id"), writes=("package",), params=(
           Param("requested_rms_jy", (float, str), None, "the requested sensitivity (QA2)", unit="Jy/beam"),
           Param("requested_beam_arcsec", (float, list, str), None, "the requested resolution, a value or [min, max]",
                 unit="arcsec"),
           Param("requested_specmode", str, None, "the requested image kind (cont, cube)"),
           Param("ms", bool, False, "carry the calibrated MS and the target MS, exported from the visibility "
                 "store, in the package (calibrated/)")))
def exportdata(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    pkg = {}
    for img in ctx.get("images", []):
        for suffix, key in img["files"].items():
            pkg[f"product/{os.path.basename(key)}"] = key
    ous = ous_name(ctx)
    # the calibration's text inputs and outputs, where the ALMA pipeline puts them
    if ctx.get("cont_dat_key"):
        pkg[f"calibration/{ous}.cont.dat"] = ctx["cont_dat_key"]
    if ctx.get("flux_csv_key"):
        pkg["calibration/flux.csv"] = ctx["flux_csv_key"]
    user = ctx.get("user") or {}
    if user.get("antennapos"):
        pkg["calibration/antennapos.csv"] = io.put_bytes(user["antennapos"].encode(), "antennapos.csv",
                                                         "text/csv")["key"]
    if user.get("flag_template"):
        name = f"{ctx.get('ms_name', ous)}_flagtemplate.txt"
        pkg[f"calibration/{name}"] = io.put_bytes(user["flag_template"].encode(), name, "text/plain")["key"]
    for name, entry in ctx.get("caltables", {}).items():
        pkg[f"calibration/{entry['name']}.tar"] = entry["key"]
    for r in ctx["stage_results"]:
        if r.get("log_key"):
            pkg[f"log/{r['index']:02d}_{r['name']}.log"] = r["log_key"]
    for eb in ctx.get("ebs", []):            # an MOUS: each EB's calibration, logged in its own run
        for index, name, key in eb.get("logs", []):
            pkg[f"log/{eb['ms_name']}/{index:02d}_{name}.log"] = key
    if (ctx.get("flux_consistency") or {}).get("factors_key"):
        pkg["calibration/flux_equalization.csv"] = ctx["flux_consistency"]["factors_key"]
    # calapply, flags, CASA restore script: per EB (an MOUS's EBs from their own runs' contexts)
    for eb_ctx in ([io.store.get_json(eb["context_key"]) for eb in ctx["ebs"]] if ctx.get("ebs") else [ctx]):
        pkg.update(calibration_package(eb_ctx, io))
        if params["ms"]:
            pkg.update(calibrated_ms(eb_ctx, io, qa))
    recipe = ctx["recipe"]
    pkg["script/recipe.json"] = io.put_bytes(json.dumps(recipe, indent=2).encode(), "recipe.json",
                                             "application/json")["key"]
    pkg["script/rerun.sh"] = io.put_bytes(RERUN.format().encode(), "rerun.sh", "text/x-shellscript")["key"]
    qa_scores = {r["name"]: {"score": r["qa_score"], "reasons": r["qa_reasons"], "metrics": r.get("qa_metrics", [])}
                 for r in ctx["stage_results"]}
    pkg["qa/qa_scores.json"] = io.put_json(qa_scores, "qa_scores.json")["key"]
    readme = README.format(run_id=ctx["run_id"], ous=ous, recipe=recipe.get("name"),
                           version=recipe.get("version"), input_key=ctx["input_key"])
    readme += "\n" + qa2_section(ctx.get("images", []), requested_goals(ctx, params))
    pkg["README"] = io.put_bytes(readme.encode(), "README", "text/plain")["key"]
    ctx["package"] = pkg
    n_fits = sum(1 for p in pkg if p.endswith(".fits"))
    qa.add(fits_images(n_fits))
    qa.note(f"Package of {len(pkg)} files, {n_fits} FITS images.")
    return qa


# What the WebLog shows: the run, the observation, every stage's results and QA, and
# what the stages' declared tables and triage entries read (stage(tables=, outliers=,
# flag_reasons=)); tests/test_stage_unit.py checks it against the code.
WEBLOG_READS = ("run_id", "recipe", "input_key", "input_format", "user", "ms_name", "mous_id", "observation",
                "fields", "stage_results", "failure", "package", "images", "continuum", "cont_dat_key", "caltables",
                "fluxscale", "flux_csv_key", "flux_consistency", "ebs", "flags", "flag_summary", "refant", "setjy",
                "spwphaseup", "bandpass_antennas", "wvr")


@stage("weblog", service="weblog", topic="Products", reads=WEBLOG_READS,
       qa=(weblog_weight,),
       writes=("stage_results", "failure", "package", "weblog_index_key"), params=(
           Param("failure", dict, None, "the failed stage of a failed run", internal=True),))
def weblog(ctx: dict, params: dict, io: StageIO) -> QA:
    """Render the WebLog. After a failed stage the gateway runs this with
    params['failure'], so the WebLog shows the failure (in red) and the package
    holds whatever the run made before it."""
    qa = QA()
    failure = params["failure"]
    if failure:
        ctx["stage_results"].append({"index": failure["index"], "name": failure["name"],
                                     "service": failure["service"], "qa_score": 0.0,
                                     "qa_reasons": [failure["error"]], "duration_s": 0.0, "params": {},
                                     "outputs": [], "log": [failure["error"]], "failed": True})
        ctx["failure"] = failure
        if "package" not in ctx:
            exportdata(ctx, {}, io)
        qa.note(f"Run failed at stage {failure['index']} ({failure['name']}).")
    out = os.path.join(io.workdir, "weblog")
    os.makedirs(out, exist_ok=True)
    plots = {}
    for r in ctx["stage_results"]:
        for o in r.get("outputs", []):
            if o["name"].endswith(".png"):
                dest = os.path.join(out, f"s{r['index']:02d}_{o['name']}")
                io.store.get_file(o["key"], dest)
                plots.setdefault(r["index"], []).append(os.path.basename(dest))
    # the image views are drawn here from the FITS products (sky axes, beam, detail views)
    views = image_views(ctx, io.fetch_file, out)
    pages = weblog_render.render(ctx, out, plots, current_index=io.stage_index, image_views=views)
    weight = weblog_render.page_weights(out)
    heaviest = max(weight["pages"], key=weight["pages"].get)
    qa.note(f"WebLog weight {weight['total'] / 1e6:.1f} MB in all; heaviest page {heaviest} "
            f"{weight['pages'][heaviest] / 1e6:.2f} MB with its images.")
    qa.add(weblog_weight(weight["total"], weight["pages"][heaviest]))
    keys = {}
    for name in sorted(os.listdir(out)):
        keys[name] = io.put_file(os.path.join(out, name), f"weblog/{name}")["key"]
    tgz = os.path.join(io.workdir, "weblog.tar.gz")
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(out, arcname="weblog")
    pkg = dict(ctx.get("package", {}))
    pkg["qa/weblog.tar.gz"] = io.put_file(tgz)["key"]
    for name, key in keys.items():
        pkg[f"qa/weblog/{name}"] = key
    ctx["package"] = pkg
    ctx["weblog_index_key"] = keys["index.html"]
    qa.note(f"WebLog of {len(pages)} pages, {sum(len(v) for v in plots.values())} plots and {len(views)} image views.")
    return qa
