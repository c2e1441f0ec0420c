"""The calibration library and the context's calibrator helpers: which fields are
calibrators, the reference antenna, each field's flux model, and the library of
calibration tables (which table applies to which fields, in which order). Pure
functions of the context (a dict): the stages that solve and apply use them."""
from __future__ import annotations

import numpy as np

from ..calibration import fluxcsv, fluxmodels, solar_system

CALIBRATOR_INTENTS = ("BANDPASS", "FLUX", "PHASE", "CHECK")


def calibrator_ids(ctx: dict) -> list:
    return sorted({f["id"] for f in ctx["fields"] if set(f["intents"]) & set(CALIBRATOR_INTENTS)})


def refant_id(ctx: dict) -> int | None:
    return ctx.get("refant", {}).get("refant_id")


def flux_function(model: dict):
    """A setjy model entry -> callable(freq_hz) -> Jy; for a solar system body a
    DiskModel, which also gives its visibilities per uv distance."""
    if model["kind"] == "ssbody":
        return solar_system.DiskModel(model["body"], model["diameter_arcsec"], model.get("ld_n", 0.0),
                                      model.get("min_vis_fraction", solar_system.MIN_VIS_FRACTION),
                                      mjd=model.get("mjd"))      # Mars's Tb varies with time
    if model["kind"] == "pb2017":
        return lambda f, s=model["standard_name"]: fluxmodels.perley_butler_2017(s, f)
    if model.get("spw_fluxes"):
        return lambda f, m=model: fluxcsv.model_flux(m, f)
    return lambda f, m=model: fluxmodels.manual_model(m["flux_jy"], m["ref_freq_hz"], m.get("spix", 0.0), f)


def field_models(ctx: dict, unit_for: list = ()) -> dict:
    """field id -> flux callable, from setjy and fluxscale; unit (1 Jy) models for unit_for."""
    models = {int(fid): flux_function(m) for fid, m in ctx.get("models", {}).items()}
    for fid in unit_for:
        models.setdefault(int(fid), lambda f: np.ones_like(np.asarray(f, float)))
    return models


def field_map(ctx: dict, rule: str, solved: set, skip: tuple = ()) -> dict | None:
    """Which solution fields each field uses, for a library entry's gainfield rule:

    'all'                -> None: any field's solutions (bandpass, WVR, spw offsets);
    'nearest-calibrator' -> a field with solutions of its own uses them (a calibrator
                            its gains, a target its Tsys), else those of fields of
                            its name (a mosaic's pointings share the Tsys measured on
                            one of them), else those of the phase calibrators;
    'own'                -> only fields with solutions of their own, each its own;
    'phase-calibrator'   -> every field except those in skip, the phase calibrators'.
    An empty list means the entry does not apply to that field."""
    if rule == "all":
        return None
    phase = [f["id"] for f in ctx["fields"] if "PHASE" in f["intents"] and f["id"] in solved] or sorted(solved)
    ids = [f["id"] for f in ctx["fields"]]
    if rule == "own":
        return {f: ([f] if f in solved else []) for f in ids}
    if rule == "phase-calibrator":
        return {f: ([] if f in skip else phase) for f in ids}
    if rule == "nearest-calibrator":
        names = {f["id"]: f["name"] for f in ctx["fields"]}
        same_name = {f: [g for g in sorted(solved) if names.get(g) == names[f]] for f in ids}
        return {f: ([f] if f in solved else same_name[f] or phase) for f in ids}
    raise ValueError(f"calibration library: unknown gainfield rule {rule!r}")   # a rule only code gives


def register(ctx: dict, table: str, kind: str, interp: str, gainfield: str, calwt: bool = True,
             **extra) -> None:
    """Add (or replace) a table in the calibration library; order is application order.
    extra: skip_fields (for 'phase-calibrator'), spwmap (informative: the spw whose
    phases each spw's solutions carry)."""
    ctx["callibrary"] = [e for e in ctx["callibrary"] if e["table"] != table]
    ctx["callibrary"].append({"table": table, "kind": kind, "interp": interp, "gainfield": gainfield,
                              "calwt": calwt, **extra})
