"""Calibration stages (calibrator service): refant, setjy, bandpass, gaincal,
fluxscale, timegaincal, applycal.

Each stage reads the spw partitions and the earlier caltables named in the
context, calls the kernels in :mod:`almapipe.calibration`, writes CASA
caltables and records in the calibration library which table applies to
which fields with which interpolation.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
import warnings
from collections import OrderedDict

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .base import (CAL_READS, COMBINE, QA, SOLINT, Metric, Param, Score, StageError, StageIO,  # noqa: E402
                   channel_rho, field_ids_with, field_name, metric, require_intent, spw_info, stage,
                   with_defaults)
from ..calibration import fluxcsv, fluxmodels, solar_system  # noqa: E402
from ..calibration.applycal import GainApply, GainWindows, apply_tables, flags_and_weights  # noqa: E402
from ..calibration.caltable import CalSolutions, read_caltable, write_caltable  # noqa: E402
from ..calibration.terms import (SolveSpec, antenna_snr, channel_average, integration_snr, point_model,  # noqa: E402
                                 row_snr2, solint_seconds, solve_term, unit_model)
from ..heuristics.callibrary import (calibrator_ids, field_map, field_models, flux_function,  # noqa: E402
                                     refant_id, register)
from ..heuristics.channels import chan_selection, spike_channels  # noqa: E402
from ..heuristics.robust import robust_sigma  # noqa: E402
from ..heuristics.solints import phaseup_interval  # noqa: E402
from ..msio import ms as msio  # noqa: E402
from ..report.plots import antenna_grid, label_panel, require_finite, robust_outliers  # noqa: E402

# ------------------------------------------------------------------ helpers

# The caltables a worker read, by key and content (sha256): the bandpass table is applied
# by the eight stages after it, each asking for every spw, and casacore read the whole
# table at each ask (5 s of the realistic EB's calibration). At most _TABLES_HELD tables
# and _TABLES_BYTES of their arrays, the least recently used dropped first.
_TABLES: OrderedDict = OrderedDict()
_TABLES_HELD = 16
_TABLES_BYTES = 256 << 20
_TABLES_LOCK = threading.Lock()


def _table_bytes(sols: list) -> int:
    return sum(a.nbytes for s in sols for a in vars(s).values() if isinstance(a, np.ndarray))


def _solutions(io: StageIO, entry: dict) -> list:
    """The CalSolutions (one per spw) of the caltable a context entry names."""
    held = (io.store.cfg.s3_endpoint, io.store.cfg.bucket, entry["key"], entry.get("sha256", ""))
    with _TABLES_LOCK:
        if held in _TABLES:
            _TABLES.move_to_end(held)
            return _TABLES[held]
    sols = read_caltable(io.fetch_dir(entry["key"]))
    with _TABLES_LOCK:
        _TABLES[held] = sols
        while len(_TABLES) > 1 and (len(_TABLES) > _TABLES_HELD or
                                    sum(_table_bytes(v) for v in _TABLES.values()) > _TABLES_BYTES):
            _TABLES.popitem(last=False)
    return sols


def load_table(io: StageIO, ctx: dict, name: str, spw: int) -> CalSolutions:
    entry = ctx["caltables"].get(name)
    if entry is None:
        raise StageError(f"no {name} table in the context: run the {name} stage first")
    for sol in _solutions(io, entry):
        if sol.spw == spw:
            return copy.deepcopy(sol)          # the caller's own: the held one stays as read
    raise StageError(f"{name} table has no solutions for spw {spw}")


def read_part(io: StageIO, part: dict, fields=None, column="DATA", data: bool = True) -> tuple[str, msio.Vis]:
    """A partition's rows of the given fields from the visibility store, and the local
    path of its EB's MS shell (the subtables a caltable refers to)."""
    p = io.vis(part)
    vis = p.read(column=column, field_ids=fields, data=data)
    io.count_visibilities(vis.flag.size)
    return p.meta, vis


def read_averaged(io: StageIO, part: dict, fields: list, flux_of_field: dict, earlier: list,
                  chans: slice | None = None) -> tuple[str, msio.Vis]:
    """What a G or T solve needs of a partition's rows of the given fields: read in row
    blocks, the earlier tables applied and the solve's channels averaged
    (terms.channel_average), so memory is one block plus one channel per row, not the
    calibrators' visibilities. Solve it with unit_model(vis) and no preapply or chans."""
    p = io.vis(part)
    blocks = []
    for vis in p.blocks(column="DATA", field_ids=fields, block_chunks=4):
        io.count_visibilities(vis.flag.size)
        blocks.append(channel_average(vis, point_model(vis, flux_of_field), chans, earlier))
    if not blocks:                                   # no rows: an empty one-channel Vis
        empty = p.read_rows(np.zeros(0, np.int64), data=True)
        blocks.append(channel_average(empty, point_model(empty, flux_of_field), chans))
    return p.meta, msio.concat_vis(blocks)


def solve_channels(selection: str, nchan: int) -> slice:
    """The channels a gain solve uses, from its spw parameter (CASA syntax; empty: all)."""
    idx = np.flatnonzero(chan_selection(selection, nchan))
    return slice(int(idx[0]), int(idx[-1]) + 1)


def save_table(io: StageIO, ctx: dict, name: str, sols: list, ms_path: str) -> dict:
    path = os.path.join(io.workdir, f"{ctx.get('ms_name', 'ms')}.{name}.tbl")
    write_caltable(sols, path, ms_path)
    entry = io.put_dir(path, os.path.basename(path))
    ctx["caltables"][name] = {"key": entry["key"], "sha256": entry["sha256"], "kind": sols[0].kind,
                              "name": os.path.basename(path)}
    return entry


def flagged_solutions(frac: float, what: str, evidence: str = "") -> Score | None:
    if frac > 0.0:
        return Score(1.0 - frac, f"{frac:.1%} of the {what} solutions of the solved antennas flagged (low SNR).",
                     evidence=evidence)
    return None


def antennas_without_solutions(missing: list, n_with_data: int, what: str, evidence: str = "") -> Score | None:
    if missing:
        return Score(1.0 - len(missing) / max(n_with_data, 1),
                     f"No {what} solutions for antenna(s) {', '.join(sorted(missing))}: all their data are flagged.",
                     evidence=evidence)
    return None


def solution_metrics(stage_name: str) -> tuple[Metric, Metric]:
    """The two metrics of a solve's solutions (solution_qa), named for its stage."""
    return (metric(f"{stage_name}.flagged_solutions", "the fraction of the solved antennas' solutions that are "
                   "flagged (below minsnr): 1 - fraction", unit="fraction")(flagged_solutions),
            metric(f"{stage_name}.antennas_without_solutions", "antennas with data but no unflagged solution: "
                   "1 - their share of the antennas with data")(antennas_without_solutions))


SOLUTION_METRICS = {name: solution_metrics(name) for name in ("bandpass", "gaincal", "timegaincal", "spwphaseup")}


def solution_qa(qa: QA, sols: list, what: str, ctx: dict, stage_name: str | None = None) -> None:
    """Score the fraction of flagged solutions of the antennas that have data;
    antennas without any unflagged solution are named rather than scored (the
    metrics of SOLUTION_METRICS[stage_name], stage_name: what by default).
    No solution at all stops the run here, where the cause is."""
    ants = ctx["observation"]["antennas"]
    if all(s.flag.all() for s in sols):
        raise StageError(f"{what}: no solutions at all: every antenna's data are flagged or below the "
                         f"minimum SNR on the calibrators (see the flagging summary)")
    flagged, total, missing = 0, 0, set()
    for s in sols:
        for a in np.unique(s.antenna):
            f = s.flag[s.antenna == a]
            if f.all():
                if ants[int(a)]["has_data"]:
                    missing.add(ants[int(a)]["name"])
                continue
            flagged += int(f.sum())
            total += f.size
    frac = flagged / max(total, 1)
    plot = f"{what}_spw{sols[0].spw}.png"         # the per-antenna plot of the first spw, where there is one
    flagged_metric, missing_metric = SOLUTION_METRICS[stage_name or what]
    qa.add(flagged_metric(frac, what, plot))
    qa.add(missing_metric(sorted(missing), sum(a["has_data"] for a in ants), what, plot))
    good = [s.snr[~s.flag] for s in sols if (~s.flag).any()]
    qa.note(f"Median {what} solution SNR {np.median(np.concatenate(good)) if good else 0:.1f}.")


def apply_for(ctx: dict, io: StageIO, spw: int) -> list:
    """The whole calibration library, in order, as GainApply (applycal)."""
    out = []
    for e in ctx["callibrary"]:
        sol = load_table(io, ctx, e["table"], spw)
        out.append(GainApply(sol, interp=e["interp"], calwt=e.get("calwt", True),
                             field_map=field_map(ctx, e["gainfield"], set(np.unique(sol.field_id).tolist()),
                                                 tuple(e.get("skip_fields", ())))))
    return out


def preapply(ctx: dict, io: StageIO, spw: int) -> list:
    """What a solve applies first: the library so far (Tsys, antenna positions,
    WVR, bandpass, ...), each with its field matching, weights untouched."""
    out = apply_for(ctx, io, spw)
    for a in out:
        a.calwt = False
    return out


# ------------------------------------------------------------------ refant

@metric("refant.flagged_fraction", "the fraction of the chosen reference antenna's calibrator data that is "
        "flagged: 0.5 above half", unit="fraction")
def refant_flagged(name: str, unflagged: float) -> Score | None:
    if unflagged < 0.5:
        return Score(0.5, f"Reference antenna {name} has {1 - unflagged:.0%} of its data flagged.")
    return None


def refant_tables(ctx: dict) -> list:
    if not ctx.get("refant"):
        return []
    return [{"title": "Reference antenna ranking", "header": ["Rank", "Antenna", "Geometry", "Flagging"],
             "rows": [[i + 1, a, f"{ctx['refant']['scores'][a]['geometry']:.2f}",
                       f"{ctx['refant']['scores'][a]['flagging']:.2f}"]
                      for i, a in enumerate(ctx["refant"]["ranked"][:10])]}]


@stage("refant", service="calibrator", topic="Calibration", reads=("observation", "fields", "partitions"),
       qa=(refant_flagged,), tables=refant_tables, writes=("refant",), params=(
           Param("refant", (str, int), None, "the reference antenna (name, id or station); none: the best ranked"),))
def refant(ctx: dict, params: dict, io: StageIO) -> QA:
    """Rank antennas by distance to the array centre and unflagged fraction (hif_refant)."""
    qa = QA()
    ants = ctx["observation"]["antennas"]
    nant = len(ants)
    good = np.zeros(nant)
    total = np.zeros(nant)
    cal = calibrator_ids(ctx)
    for part in ctx["partitions"]:
        _, vis = read_part(io, part, fields=cal, data=False)     # flags are all it counts
        per_row = (~vis.flag).sum(axis=(1, 2))
        for a in (vis.ant1, vis.ant2):
            good += np.bincount(a, per_row, nant)
            total += np.bincount(a, np.full(len(a), vis.flag[0].size), nant)
    frac = np.where(total > 0, good / np.maximum(total, 1), 0)
    pos = np.array([a["position"] for a in ants])
    has = frac > 0
    if not has.any():
        raise StageError("refant: all antennas are flagged on the calibrators")
    centre = pos[has].mean(axis=0)
    dist = np.linalg.norm(pos - centre, axis=1)
    geo = np.where(has, 1 - dist / max(dist[has].max(), 1e-9), 0)
    flagscore = np.where(has, frac / frac.max(), 0)
    score = geo + flagscore
    order = [int(i) for i in np.argsort(-score) if has[i]]
    chosen = order[0]
    forced = params["refant"]
    if forced not in (None, ""):
        match = [a["id"] for a in ants if a["name"] == str(forced) or str(a["id"]) == str(forced)
                 or a["station"] == str(forced)]
        if not match:
            raise StageError(f"refant: no antenna {forced!r}; antennas: {', '.join(a['name'] for a in ants)}")
        chosen = match[0]
        order = [chosen] + [i for i in order if i != chosen]
        qa.note(f"Reference antenna {ants[chosen]['name']} set by the recipe.")
    ctx["refant"] = {"refant_id": chosen, "refant": ants[chosen]["name"],
                     "ranked": [ants[i]["name"] for i in order],
                     "scores": {ants[i]["name"]: {"geometry": float(geo[i]), "flagging": float(flagscore[i])}
                                for i in order}}
    io.log("reference antennas (best first): %s", ",".join(ctx["refant"]["ranked"][:8]))
    qa.add(refant_flagged(ants[chosen]["name"], frac[chosen]))
    qa.note(f"Reference antenna {ants[chosen]['name']} ({ants[chosen]['station']}).")
    return qa


# ------------------------------------------------------------------ setjy

def catalogue_fluxes(ctx: dict) -> dict:
    """The flux.csv beside the EB (ALMA's columns, or almapipe's earlier form) as setjy
    manual models for this EB's science spws."""
    freqs = {p["spw"]: float(np.mean(spw_info(ctx, p["spw"])["chan_freq_hz"])) for p in ctx["partitions"]}
    try:
        return fluxcsv.parse(ctx["user"].get("flux_csv", "") or "", freqs, ctx.get("ms_name"))
    except fluxcsv.FluxCsvError as exc:
        raise StageError(f"setjy: {exc}") from None


def _flux_scan_mjd(ctx: dict, fid: int) -> float:
    """The middle of the field's scans (MJD), where a moving body's geometry is taken."""
    from astropy.time import Time
    scans = [s for s in ctx["observation"].get("scans", []) if s["field_id"] == fid] or \
        ctx["observation"].get("scans", [])
    if not scans:
        raise StageError("setjy: no scans in the observation summary to time the solar system body's geometry")
    t0 = Time(min(s["start"] for s in scans), format="isot", scale="utc").mjd
    t1 = Time(max(s["end"] for s in scans), format="isot", scale="utc").mjd
    return (t0 + t1) / 2


def solar_system_model(ctx: dict, io: StageIO, fid: int, body: str, params: dict) -> dict:
    """setjy's model entry of a solar system body (Butler-JPL-Horizons 2012, see
    calibration.solar_system): its geometry at the middle of its scans from the
    ephemeris table attached to its FIELD row, else (planets) from astropy."""
    mjd = _flux_scan_mjd(ctx, fid)
    ms = io.fetch_meta(ctx["partitions"][0]["meta"])
    try:
        eph = solar_system.field_ephemeris(ms, fid)
        geo = solar_system.body_geometry(body, mjd, eph)
    except ValueError as exc:
        raise StageError(f"setjy: flux calibrator {field_name(ctx, fid)}: {exc}") from None
    return {"kind": "ssbody", "body": body, "origin": "Butler-JPL-Horizons 2012 (disk)", "mjd": mjd,
            "diameter_arcsec": geo["diameter_arcsec"], "distance_au": geo["distance_au"],
            "radius_km": geo["radius_km"], "sub_obs_lat_deg": geo["sub_obs_lat_deg"], "ephemeris": geo["ephemeris"],
            "ld_n": solar_system.BODIES[body]["ld_n"],
            "min_vis_fraction": float(params["min_vis_fraction"])}


@metric("setjy.resolved_out", "whether a solar system flux calibrator's disk leaves baselines to solve on in "
        "each spw: 0.3 when its visibility is below min_vis_fraction on every baseline (no flux scale)")
def resolved_out(name: str, spw: int, shortest_m: float, b_max_m: float, min_vis_fraction: float) -> Score | None:
    """b_max_m: the longest baseline on which the disk's visibility is above min_vis_fraction."""
    if shortest_m > b_max_m:
        return Score(0.3, f"{name} spw {spw}: resolved out on every baseline (shortest {shortest_m:.0f} m, disk "
                          f"visibility below {min_vis_fraction:.0%} beyond {b_max_m:.0f} m): no flux scale.")
    return None


def setjy_tables(ctx: dict) -> list:
    if not ctx.get("setjy"):
        return []
    return [{"title": "Flux density models", "header": ["Field", "spw", "Frequency (GHz)", "Flux (Jy)", "Model"],
             "rows": [[r["field"], r["spw"], f"{r['freq_hz'] / 1e9:.6f}", f"{r['flux_jy']:.4f}", r["model"]]
                      for r in ctx["setjy"]]}]


@stage("setjy", service="calibrator", topic="Calibration", qa=(resolved_out,), tables=setjy_tables,
       reads=("fields", "observation", "partitions", "user", "ms_name"), writes=("models", "setjy"), params=(
           Param("manual", dict, None, "flux models by field name: {flux_jy, ref_freq_hz, spix, spw_fluxes}; "
                 "they win over flux.csv and the solar system models"),
           Param("min_vis_fraction", float, solar_system.MIN_VIS_FRACTION, "a resolved body's baselines whose "
                 "model visibility falls below this fraction of its flux are not used", min=0.0, max=1.0)))
def setjy(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flux density models of the flux calibrators: Perley-Butler 2017, manual, or,
    for a solar system body, a disk of the Butler-JPL-Horizons 2012 brightness
    temperature at its distance (resolved: the solvers use its visibilities per
    uv distance, on the baselines that do not resolve it out)."""
    qa = QA()
    catalogue = catalogue_fluxes(ctx)
    manual = dict(catalogue)
    manual.update(params["manual"] or {})
    models = {}
    spw_freqs = {p["spw"]: float(np.mean(spw_info(ctx, p["spw"])["chan_freq_hz"])) for p in ctx["partitions"]}
    for fid in require_intent(ctx, "FLUX", "setjy"):
        name = field_name(ctx, fid)
        body = solar_system.body_name(name)
        # a body's disk model wins over a flux.csv entry (a point flux would ignore
        # its resolution); an explicit setjy.manual entry still wins over both
        if body is not None and name not in (params["manual"] or {}):
            if name in catalogue:
                qa.note(f"{name}: flux.csv gives {catalogue[name]['flux_jy']:.3f} Jy; the Butler-JPL-Horizons "
                        f"2012 disk model is used instead (a solar system body is resolved).")
            models[str(fid)] = solar_system_model(ctx, io, fid, body, params)
            continue
        if name in manual:
            m = manual[name]
            models[str(fid)] = {"kind": "manual", "flux_jy": float(m["flux_jy"]),
                                "ref_freq_hz": float(m.get("ref_freq_hz", next(iter(spw_freqs.values())))),
                                "spix": float(m.get("spix", 0.0)), "spw_fluxes": m.get("spw_fluxes"),
                                "origin": "setjy manual" if name in (params["manual"] or {}) else "flux.csv"}
            continue
        std = fluxmodels.standard_calibrator(name)
        if std is None:
            raise StageError(f"setjy: flux calibrator {name!r} is not a standard calibrator "
                             f"({', '.join(fluxmodels.ALIASES)}) nor a solar system body "
                             f"({', '.join(b.capitalize() for b in solar_system.BODIES)}); give setjy.manual for it")
        models[str(fid)] = {"kind": "pb2017", "standard_name": std, "origin": "Perley-Butler 2017"}
    ctx["models"] = models
    ctx["setjy"] = []
    for fid, m in models.items():
        fn = flux_function(m)
        fname = field_name(ctx, int(fid))
        for spw, f in spw_freqs.items():
            try:
                flux = float(fn(np.array([f]))[0])
            except ValueError as exc:          # a body's Tb model does not cover the frequency
                raise StageError(f"setjy: {fname} spw {spw}: {exc}") from None
            row = {"field": fname, "spw": spw, "freq_hz": f, "flux_jy": flux, "model": m["origin"]}
            if m["kind"] == "ssbody":
                row.update(tb_k=float(fn.tb_k(f)),
                           diameter_arcsec=m["diameter_arcsec"], uv_max_lambda=fn.uv_max_lambda)
                m.setdefault("tb_k", {})[str(spw)] = row["tb_k"]
            ctx["setjy"].append(row)
            io.log("setjy %s spw %d: %.4f Jy at %.6f GHz (%s)", fname, spw, flux, f / 1e9, m["origin"])
            qa.note(f"{fname} spw {spw}: {flux:.3f} Jy ({m['origin']}).")
        if m["kind"] == "ssbody":
            _note_resolved(qa, ctx, fname, m, fn, spw_freqs)
    return qa


def _note_resolved(qa: QA, ctx: dict, name: str, m: dict, fn, spw_freqs: dict) -> None:
    """The disk's size and where the solvers stop using it (the uv cut), in the QA."""
    q_max = fn.uv_max_lambda
    m["uv_max_lambda"] = q_max
    qa.note(f"{name}: disk {m['diameter_arcsec']:.3f} arcsec at {m['distance_au']:.4f} AU ({m['ephemeris']}).")
    longest = ctx["observation"].get("baselines_m", {}).get("max", 0.0)
    shortest = ctx["observation"].get("baselines_m", {}).get("min", 0.0)
    for spw, f in spw_freqs.items():
        b_max = q_max * 299792458.0 / f
        if longest > b_max:
            qa.note(f"{name} spw {spw}: baselines longer than {b_max:.0f} m ({q_max / 1e3:.0f} klambda) not used "
                    f"in the solves: the disk's visibility is below {m['min_vis_fraction']:.0%} of its flux there.")
        qa.add(resolved_out(name, spw, shortest, b_max, m["min_vis_fraction"]))
    # antennas with too few baselines inside the cut get no gains on the body, so no
    # flux scale of their own (baseline lengths, not projections: an upper bound)
    b_max = q_max * 299792458.0 / max(spw_freqs.values())
    ants = [a for a in ctx["observation"].get("antennas", []) if a.get("has_data")]
    if ants and longest > b_max:
        pos = np.array([a["position"] for a in ants])
        short = (np.linalg.norm(pos[:, None] - pos[None], axis=2) <= b_max).sum(axis=1) - 1
        few = [a["name"] for a, n in zip(ants, short) if n < 4]
        if few:
            qa.note(f"{name}: antenna(s) {', '.join(few)} have fewer than 4 baselines shorter than {b_max:.0f} m: "
                    f"they may get no gain solutions on {name} (fluxscale then rests on the others).")


# ------------------------------------------------------------------ bandpass

BANDPASS_PARAMS = (
    Param("solint", (str, int, float), "inf", "bandpass solution interval", pattern=SOLINT),
    Param("combine", str, "scan", "boundaries a solution interval crosses", pattern=COMBINE),
    Param("minsnr", float, 3.0, "solutions below this SNR are flagged", min=0.0),
    Param("solnorm", bool, True, "normalise the bandpass amplitudes to a mean of 1"),
    Param("phaseup_solint", (str, int, float), "int", "phase-up interval; snr: from the calibrator's SNR",
          pattern="snr|" + SOLINT),
    Param("phaseup_minsnr", float, 2.0, "phase-up solutions below this SNR are flagged", min=0.0),
    Param("phaseup_lo", float, 0.1, "phase-up channels from this fraction of the band", min=0.0, max=1.0),
    Param("phaseup_hi", float, 0.9, "phase-up channels up to this fraction of the band", min=0.0, max=1.0),
    Param("phaseup_snr", float, 20.0, "phaseup_solint snr: the SNR the interval should reach", min=0.0),
    Param("phaseup_nsolint", int, 2, "phaseup_solint snr: at least this many solutions per scan", min=1),
    Param("flag_outliers", bool, False, "flag bandpass channels that spike (hifa_bandpassflag)"),
    Param("outlier_nsigma", float, 8.0, "flag_outliers: robust sigmas of a spike", min=0.0))


@metric("bandpass.antenna_shape", "antennas whose bandpass amplitude shape is far from the array's "
        "(report.plots.robust_outliers, framed red on the per-antenna plot): 0.8 each")
def bandpass_outliers(outliers: list) -> list:
    """outliers: [{antenna, spw, why}] from the per-antenna plot."""
    return [Score(0.8, f"spw {o['spw']}: bandpass of antenna {o['antenna']}: {o['why']}.",
                  evidence=f"bandpass_spw{o['spw']}.png") for o in outliers]


@metric("bandpass.phaseup_snr", "phaseup_solint snr: the phase-up SNR the longest allowed interval reaches on the "
        "bandpass calibrator against phaseup_snr: 0.6 below it (the bandpass may decorrelate)")
def phaseup_snr(names: str, spw: int, expected: float, target: float, solint: str) -> Score | None:
    if expected < target:
        return Score(0.6, f"Bandpass calibrator {names} too weak for a phase-up in spw {spw}: SNR {expected:.1f} "
                          f"over {solint} (wanted {target:g}); the bandpass may decorrelate.")
    return None


def bandpass_tables(ctx: dict) -> list:
    """The antennas to look at: outliers and antennas without solutions (lowgainflag's
    named), the table Home's triage links."""
    ba = ctx.get("bandpass_antennas")
    if not ba:
        return []
    rows = [[o["antenna"], o["spw"], f"outlier: {o['why']}"] for o in ba["outliers"]]
    rows += [[a, spw, "no solutions: its data are flagged" + (" (lowgainflag)" if a in
                                                              ctx["flags"].get("lowgainflag", []) else "")]
             for spw, names in ba["no_solutions"].items() for a in names]
    if not rows:
        return []
    return [{"title": "Antennas to look at (marked on the per-antenna plots)", "evidence": "table-bandpass-antennas",
             "header": ["Antenna", "spw", "What"], "rows": rows}]


def bandpass_outlier_names(ctx: dict, link) -> list:
    """Home's triage: each antenna and spw whose bandpass is an outlier on the plots."""
    return [{"what": f"antenna {o['antenna']} spw {o['spw']}", "why": f"bandpass {o['why']}",
             "href": link("bandpass", f"bandpass_spw{o['spw']}.png"), "also": ""}
            for o in (ctx.get("bandpass_antennas") or {}).get("outliers", [])]


@stage("bandpass", service="calibrator", topic="Calibration",
       qa=(bandpass_outliers, phaseup_snr) + SOLUTION_METRICS["bandpass"], tables=bandpass_tables,
       outliers=bandpass_outlier_names, reads=CAL_READS + ("ms_name",),
       writes=("caltables", "callibrary", "bandpass_phaseup", "bandpass_antennas"), params=BANDPASS_PARAMS)
def bandpass(ctx: dict, params: dict, io: StageIO) -> QA:
    """Bandpass per antenna and channel, after a phase-up gaincal (hifa_bandpass)."""
    qa = QA()
    bp_ids = require_intent(ctx, "BANDPASS", "bandpass")
    ref = refant_id(ctx)
    sols, ms_path, outliers, no_solutions = [], None, [], {}
    for part in ctx["partitions"]:
        ms_path, vis = read_part(io, part, fields=bp_ids)
        nchan = len(vis.freq)
        models = field_models(ctx, unit_for=bp_ids)
        model = point_model(vis, models)
        # Phase-up: per-integration phases on the central channels, so that the
        # time-averaged bandpass solve does not decorrelate.
        centre = slice(int(nchan * params["phaseup_lo"]), max(int(nchan * params["phaseup_hi"]), 1))
        earlier = preapply(ctx, io, part["spw"])
        solint = params["phaseup_solint"]
        if solint == "snr":
            solint = _phaseup_solint_from_snr(vis, model, ref, centre, earlier, params, qa, ctx, part["spw"])
        phaseup = solve_term(vis, model, SolveSpec(kind="G", solint=solint,
                                                   calmode="p", refant=ref, chans=centre,
                                                   minsnr=params["phaseup_minsnr"], preapply=earlier))
        bp = solve_term(vis, model, SolveSpec(kind="B", solint=params["solint"],
                                              combine=params["combine"], calmode="ap", refant=ref,
                                              minsnr=params["minsnr"], solnorm=params["solnorm"],
                                              preapply=earlier + [GainApply(phaseup, interp="nearest", calwt=False)]))
        if params["flag_outliers"]:
            flag_bandpass_outliers(bp, params["outlier_nsigma"])
        sols.append(bp)
        found, unsolved = _plot_bandpass(io, bp, ctx, part["spw"])
        no_solutions[str(part["spw"])] = unsolved
        outliers += found
        qa.add(bandpass_outliers(found))
    # named on the WebLog's Home and the bandpass page
    ctx["bandpass_antennas"] = {"outliers": outliers, "no_solutions": no_solutions}
    save_table(io, ctx, "bandpass", sols, ms_path)
    register(ctx, "bandpass", "B", "nearest", "all")
    solution_qa(qa, sols, "bandpass", ctx)
    return qa


def _phaseup_solint_from_snr(vis, model, ref, chans, earlier, params, qa, ctx, spw) -> str:
    """Measure the per-integration phase SNR on the bandpass calibrator and choose
    the phase-up interval from it; a calibrator too weak even over the longest
    allowed interval is named in the QA."""
    data, flag, _ = apply_tables(vis, earlier) if earlier else (vis.data, vis.flag, None)
    snr_int = integration_snr(dataclasses.replace(vis, data=data, flag=flag), model, chans, channel_rho(ctx, spw))
    int_s = float(np.median(vis.interval)) if len(vis.interval) else 1.0
    used = ~vis.flag.all(axis=(1, 2))          # scans with data (not the flagged Tsys scans)
    scan_s = min((np.ptp(vis.time[used & (vis.scan == s)]) + int_s for s in np.unique(vis.scan[used])), default=int_s)
    params = with_defaults(BANDPASS_PARAMS, params)       # also called with a few parameters (tests)
    target = params["phaseup_snr"]
    n, expected = phaseup_interval(snr_int, int_s, scan_s, target, params["phaseup_nsolint"])
    solint = "int" if n == 1 else f"{n * int_s:g}s"
    ctx.setdefault("bandpass_phaseup", {})[str(spw)] = {"snr_per_integration": snr_int, "solint": solint,
                                                        "expected_snr": expected}
    names = ", ".join(field_name(ctx, int(f)) for f in np.unique(vis.field_id))
    qa.add(phaseup_snr(names, spw, expected, target, solint))
    qa.note(f"spw {spw}: phase-up interval {solint} (SNR per integration {snr_int:.1f}).")
    return solint


def flag_bandpass_outliers(bp: CalSolutions, nsigma: float) -> int:
    """hifa_bandpassflag, in brief: flag solution channels that spike away from the
    antenna's smooth bandpass amplitude (flagging.spike_channels); returns how many."""
    amp = np.abs(bp.cparam)
    n = 0
    for r in range(amp.shape[0]):
        for p in range(amp.shape[2]):
            bad = spike_channels(amp[r, :, p], ~bp.flag[r, :, p], nsigma)
            bp.flag[r, bad, p] = True
            n += int(bad.sum())
    return n


def _plot_bandpass(io, bp: CalSolutions, ctx, spw) -> list:
    """Amplitude and phase of the bandpass, one small panel per antenna with data (so a
    bad antenna can be named): antennas without unflagged solutions say so, outliers
    (amplitude shape far from the array's, report.plots.robust_outliers) are framed
    red. Returns the outliers [{antenna, spw, why}] and the antennas without solutions."""
    ants = [a for a in ctx["observation"]["antennas"] if a.get("has_data", True)]
    g = np.where(bp.flag, np.nan, bp.cparam)                     # (nrow, nchan, ncorr)
    chan = np.arange(len(bp.freq))
    # an antenna flagged in some channels gives all-NaN columns: numpy warns on each, in
    # the worker's log, for what the NaN-aware statistics are meant to skip
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # each antenna's amplitude shape (normalised), and its rms distance from the array's
        shape = {}
        for a in ants:
            amp = np.abs(g[bp.antenna == a["id"]])
            if np.isfinite(amp).any():
                s = np.nanmean(amp, axis=(0, 2))
                shape[a["name"]] = s / np.nanmedian(s)
        ref = np.nanmedian(np.array(list(shape.values())), axis=0) if shape else None
        dev = {n: float(np.sqrt(np.nanmean((s - ref) ** 2))) for n, s in shape.items()}
    bad = robust_outliers(dev, nsigma=6.0, floor=0.05)
    require_finite(f"bandpass plot of spw {spw}", np.abs(g))
    for kind in ("amplitude", "phase"):
        fig, axes = antenna_grid(len(ants), f"Bandpass {kind}, spw {spw}, per antenna "
                                            f"(lines: correlations; red frame: outlier)")
        for ax, a in zip(axes, ants):
            rows = g[bp.antenna == a["id"]]
            for p in range(g.shape[2]):
                y = np.abs(rows[:, :, p]) if kind == "amplitude" else np.degrees(np.angle(rows[:, :, p]))
                for r in range(len(y)):
                    ax.plot(chan, y[r], lw=0.6, color=f"C{p}")
            label_panel(ax, a["name"], "flagged" if a["name"] not in shape else
                        "outlier" if a["name"] in bad else "")
        fig.ylabel = "amplitude" if kind == "amplitude" else "phase (deg)"
        fig.xlabel = "channel"
        io.plot(fig, f"bandpass_spw{spw}.png" if kind == "amplitude" else f"bandpass_phase_spw{spw}.png")
    return ([{"antenna": n, "spw": spw, "why": f"amplitude shape {dev[n]:.1%} rms from the array's "
                                               f"({sig:.0f} robust sigma)"} for n, sig in sorted(bad.items())],
            [a["name"] for a in ants if a["name"] not in shape])


# ------------------------------------------------------------------ gaincal and timegaincal

GAIN_PARAMS = (
    Param("solint", (str, int, float), "inf", "amplitude and phase solution interval", pattern=SOLINT),
    Param("combine", str, "", "boundaries a solution interval crosses", pattern=COMBINE),
    Param("calmode", str, "ap", "what is solved: amplitude and phase, phase or amplitude", choices=("ap", "p", "a")),
    Param("gaintype", str, "G", "G: per polarisation; T: one for both", choices=("G", "T")),
    Param("minsnr", float, 3.0, "solutions below this SNR are flagged", min=0.0),
    Param("spw", str, "", "channels solved on, CASA syntax (0:6~56); empty: all"),
    Param("phaseup_solint", (str, int, float), None, "phase-only interval solved first; none: no phase-up",
          pattern=SOLINT),
    Param("phaseup_minsnr", float, 2.0, "phase-up solutions below this SNR are flagged", min=0.0))


class PhaseSolver:
    """Phase-only solutions per spw for a gain solve, taken from the spw that
    spwphaseup maps each spw to (a narrow spw gets a wide one's phases, relabelled
    as its own); each (spw, interval, fields) is solved once."""

    def __init__(self, ctx, params, io, unit_fields):
        self.ctx, self.params, self.io, self.unit_fields = ctx, params, io, unit_fields
        self.spwmap = {int(k): int(v) for k, v in ctx.get("spwphaseup", {}).get("spwmap", {}).items()}
        self.parts = {p["spw"]: p for p in ctx["partitions"]}
        self.cache = {}

    def source(self, spw: int) -> int:
        src = self.spwmap.get(spw, spw)
        return src if src in self.parts else spw

    def __call__(self, spw: int, solint: str, fields: list, own: msio.Vis | None = None) -> CalSolutions:
        """own: this spw's rows, covering at least these fields, as read_averaged gave
        them to the caller over the same channels; used when the spw takes its own phases."""
        src = self.source(spw)
        key = (src, solint, tuple(fields))
        if key not in self.cache:
            if src == spw and own is not None:
                vis = own.select(np.isin(own.field_id, fields))
            else:
                part = self.parts[src]
                _, vis = read_averaged(self.io, part, fields, field_models(self.ctx, unit_for=self.unit_fields),
                                       preapply(self.ctx, self.io, src),
                                       solve_channels(self.params["spw"], self.io.vis(part).nchan))
            self.cache[key] = solve_term(vis, unit_model(vis), SolveSpec(
                kind="G", solint=solint, calmode="p", refant=refant_id(self.ctx),
                minsnr=self.params["phaseup_minsnr"]))
        sol = self.cache[key]
        if src == spw:
            return sol
        freq = np.array([np.mean(spw_info(self.ctx, spw)["chan_freq_hz"])])
        return dataclasses.replace(sol, spw=spw, freq=freq)


def _gain_solve(ctx, params, io, name: str, fields: list, unit_fields: list, qa: QA,
                transfer_fields: list | None = None) -> None:
    """Gains on the given calibrator fields, bandpass applied: phases on a short
    interval (phaseup_solint) first, so the amplitudes of the longer interval are
    not lowered by decorrelation, then amplitude and phase per solint. The table
    is the product of the two, at the phase cadence.

    With transfer_fields (timegaincal) a second table is made for the fields that
    have no solutions of their own (targets, check sources): phases per scan on
    the phase calibrators times the amplitudes, as hifa_timegaincal transfers them."""
    ref = refant_id(ctx)
    if "bandpass" not in ctx["caltables"]:
        raise StageError(f"{name}: no bandpass table in the context: run bandpass first")
    phases_of = PhaseSolver(ctx, params, io, unit_fields)
    sols, transfer, ms_path = [], [], None
    for part in ctx["partitions"]:
        # the bandpass and the rest of the library applied, the solve's channels averaged
        ms_path, vis = read_averaged(io, part, fields, field_models(ctx, unit_for=unit_fields),
                                     preapply(ctx, io, part["spw"]), solve_channels(params["spw"], io.vis(part).nchan))
        phases = phases_of(part["spw"], params["phaseup_solint"], fields, vis) if params["phaseup_solint"] \
            else None
        later = [GainApply(phases, interp="linear", calwt=False)] if phases is not None else []
        g = solve_term(vis, unit_model(vis), SolveSpec(kind=params["gaintype"], solint=params["solint"],
                                                       combine=params["combine"], calmode=params["calmode"],
                                                       refant=ref, minsnr=params["minsnr"], preapply=later))
        # the table must undo everything the solve saw: phase-up phases times the gains
        sols.append(g if phases is None else combine_phase_gain(phases, g))
        _plot_gains(io, sols[-1], ctx, part["spw"], name)
        if transfer_fields is not None:
            scan_phases = phases_of(part["spw"], params["transfer_solint"], transfer_fields, vis)
            transfer.append(combine_phase_gain(scan_phases, g, amplitude_only=True))
    save_table(io, ctx, name, sols, ms_path)
    solution_qa(qa, sols, name, ctx)
    if transfer_fields is not None:
        save_table(io, ctx, f"{name}_transfer", transfer, ms_path)


def combine_phase_gain(phases: CalSolutions, gains: CalSolutions, amplitude_only: bool = False) -> CalSolutions:
    """One table at the phase solutions' cadence: each phase solution times the
    gain of the same antenna, field and scan (flagged where either is); with
    amplitude_only, times the gain's amplitude only (the phases are all in
    'phases', as for the per-scan phases transferred to targets)."""
    cp = phases.cparam.copy()
    flag = phases.flag.copy()
    lookup = {(int(a), int(f), int(s)): r for r, (a, f, s) in
              enumerate(zip(gains.antenna, gains.field_id, gains.scan))}
    for r, key in enumerate(zip(phases.antenna.tolist(), phases.field_id.tolist(), phases.scan.tolist())):
        k = lookup.get(key)
        if k is None:
            flag[r] = True
            continue
        cp[r] = cp[r] * (np.abs(gains.cparam[k]) if amplitude_only else gains.cparam[k])
        flag[r] |= gains.flag[k]
    return CalSolutions(gains.kind, gains.spw, gains.freq, phases.time, phases.interval, phases.field_id,
                        phases.scan, phases.antenna, cp, flag, np.minimum(phases.snr, gains.snr.max()), gains.refant)


def _plot_gains(io, g: CalSolutions, ctx, spw, name):
    """Gain amplitude and phase vs time, one small panel per antenna (colours: fields;
    antennas without unflagged solutions say so)."""
    ants = [a for a in ctx["observation"]["antennas"] if a.get("has_data", True)]
    require_finite(f"{name} plot of spw {spw}", np.where(g.flag[:, 0, :], np.nan, np.abs(g.cparam[:, 0, :])))
    t0 = g.time.min()
    fids = [int(f) for f in np.unique(g.field_id)]
    for kind in ("amp", "phase"):
        fig, axes = antenna_grid(len(ants), f"{name} {'amplitude' if kind == 'amp' else 'phase (deg)'} vs hours, "
                                            f"spw {spw}, per antenna; colours: "
                                            + ", ".join(f"{field_name(ctx, f)} (C{i})" for i, f in enumerate(fids)))
        for ax, a in zip(axes, ants):
            any_ok = False
            for i, fid in enumerate(fids):
                for p in range(g.cparam.shape[2]):
                    ok = (g.antenna == a["id"]) & (g.field_id == fid) & ~g.flag[:, 0, p]
                    any_ok |= bool(ok.any())
                    y = np.abs(g.cparam[ok, 0, p]) if kind == "amp" else np.degrees(np.angle(g.cparam[ok, 0, p]))
                    ax.plot((g.time[ok] - t0) / 3600, y, ".", ms=1.5, color=f"C{i}")
            label_panel(ax, a["name"], "" if any_ok else "flagged")
        io.plot(fig, f"{name}_spw{spw}.png" if kind == "amp" else f"{name}_phase_spw{spw}.png")


@stage("gaincal", service="calibrator", topic="Calibration", qa=SOLUTION_METRICS["gaincal"],
       reads=CAL_READS + ("spwphaseup", "ms_name"),
       writes=("caltables", "callibrary"), params=GAIN_PARAMS)
def gaincal(ctx: dict, params: dict, io: StageIO) -> QA:
    """Gains of all calibrators with the bandpass applied; non-flux calibrators
    get a 1 Jy model, so fluxscale can transfer the scale."""
    qa = QA()
    require_intent(ctx, "FLUX", "gaincal")
    unit = [f for f in calibrator_ids(ctx) if str(f) not in ctx.get("models", {})]
    _gain_solve(ctx, params, io, "gaincal", calibrator_ids(ctx), unit, qa)
    return qa


@metric("timegaincal.flux_models", "calibrators solved without a flux model (fluxscale not run before): 0.6 "
        "when any (solved with 1 Jy)")
def missing_flux_models(names: list) -> Score | None:
    if names:
        return Score(0.6, f"No flux model for {', '.join(names)}: solved with 1 Jy (run fluxscale first).")
    return None


@stage("timegaincal", service="calibrator", topic="Calibration",
       qa=(missing_flux_models,) + SOLUTION_METRICS["timegaincal"],
       reads=CAL_READS + ("spwphaseup", "ms_name"),
       writes=("caltables", "callibrary"), params=GAIN_PARAMS + (
           Param("interp", str, "linear", "interpolation of the gains in time", choices=("linear", "nearest")),
           Param("transfer_solint", (str, int, float), "inf",
                 "phase interval on the phase calibrators transferred to the targets", pattern=SOLINT)))
def timegaincal(ctx: dict, params: dict, io: StageIO) -> QA:
    """Final time-dependent gains with every calibrator's flux known (hifa_timegaincal):
    the bandpass, flux and phase calibrators get their own (phases per integration
    times amplitudes per scan); targets and check sources get the phase
    calibrators' phases per scan and amplitudes, interpolated in time, so a check
    source measures how well phases transfer."""
    qa = QA()
    phase_ids = require_intent(ctx, "PHASE", "timegaincal")
    check_only = set(field_ids_with(ctx, "CHECK")) - set(field_ids_with(ctx, "BANDPASS")) - \
        set(field_ids_with(ctx, "FLUX")) - set(phase_ids)
    own = [f for f in calibrator_ids(ctx) if f not in check_only]
    missing = [field_name(ctx, f) for f in own if str(f) not in ctx.get("models", {})]
    qa.add(missing_flux_models(missing))
    _gain_solve(ctx, params, io, "timegaincal", own, own, qa, transfer_fields=phase_ids)
    spwmap = ctx.get("spwphaseup", {}).get("spwmap", {})
    register(ctx, "timegaincal", "G", params["interp"], "own", spwmap=spwmap)
    register(ctx, "timegaincal_transfer", "G", params["interp"], "phase-calibrator",
             skip_fields=own, spwmap=spwmap)
    qa.note(f"Targets and check sources calibrated with the phases per scan of "
            f"{', '.join(field_name(ctx, f) for f in phase_ids)}.")
    return qa


# ------------------------------------------------------------------ spwphaseup

@metric("spwphaseup.phase_snr", "the best spw's phase SNR per solint on the phase calibrators against "
        "phasesnr: 0.5 when no spw reaches it (all spws take the best one's phases)")
def best_phase_snr(best_spw: int, best_snr: float, threshold: float, solint, phase_names: list) -> Score | None:
    if best_snr < threshold:
        return Score(0.5, f"No spw reaches phase SNR {threshold:g} per {solint} on "
                          f"{', '.join(phase_names)} (best: spw {best_spw}, {best_snr:.1f}); "
                          f"all spws take spw {best_spw}'s phases.")
    return None


def spwphaseup_tables(ctx: dict) -> list:
    up = ctx.get("spwphaseup")
    if not up:
        return []
    return [{"title": f"Phase SNR per {up['solint']} on the phase calibrator (threshold {up['phasesnr']:g})",
             "header": ["spw", "SNR", "Phases from spw"],
             "rows": [[s, f"{v:.1f}", up["spwmap"][s]] for s, v in up["snr"].items()]}]


@stage("spwphaseup", service="calibrator", topic="Calibration",
       qa=(best_phase_snr,) + SOLUTION_METRICS["spwphaseup"], tables=spwphaseup_tables,
       reads=CAL_READS + ("ms_name",),
       writes=("spwphaseup",), params=(
           Param("solint", (str, int, float), "int", "phase solution interval of the SNR test", pattern=SOLINT),
           Param("phasesnr", float, 32.0, "a spw below this phase SNR takes a wider spw's phases", min=0.0),
           Param("minsnr", float, 3.0, "solutions below this SNR are flagged", min=0.0)))
def spwphaseup(ctx: dict, params: dict, io: StageIO) -> QA:
    """Which spw's phases each spw uses, and the phase offsets between spws (hifa_spwphaseup).

    The phase SNR per solution interval is measured on the phase calibrators in
    every spw; a spw below phasesnr takes the phases of the strongest spw (its
    time-dependent phases are solved there), and a per-antenna phase offset of
    every spw, solved over the whole observation, is applied first so the mapped
    phases fit."""
    qa = QA()
    phase_ids = require_intent(ctx, "PHASE", "spwphaseup")
    if "bandpass" not in ctx["caltables"]:
        raise StageError("spwphaseup: no bandpass table in the context: run bandpass first")
    ref = refant_id(ctx)
    solint = params["solint"]
    threshold = float(params["phasesnr"])
    snr, offsets, ms_path = {}, [], None
    for part in ctx["partitions"]:
        # in row blocks, the library applied once for both uses: each row's SNR (from its
        # channels) and its channel average (for the phase offsets)
        p = io.vis(part)
        ms_path, models, earlier = p.meta, field_models(ctx, unit_for=phase_ids), preapply(ctx, io, part["spw"])
        snr2, averaged = [], []
        for block in p.blocks(column="DATA", field_ids=phase_ids, block_chunks=4):
            io.count_visibilities(block.flag.size)
            model = point_model(block, models)
            data, flag, _ = apply_tables(block, earlier)
            corrected = dataclasses.replace(block, data=data, flag=flag)
            snr2.append(row_snr2(corrected, model, rho=channel_rho(ctx, part["spw"])))
            averaged.append(channel_average(corrected, model))
        if not averaged:
            raise StageError(f"spwphaseup: spw {part['spw']} has no phase calibrator rows")
        vis = msio.concat_vis(averaged)
        # per integration, then scaled to the interval the phases will be solved on
        int_s = float(np.median(vis.interval)) if len(vis.interval) else 1.0
        secs = int_s if solint == "int" else solint_seconds(solint)
        snr[part["spw"]] = antenna_snr(vis.time, vis.ant1, vis.ant2, np.concatenate(snr2)) * \
            np.sqrt(max(secs / int_s, 1.0))
        offsets.append(solve_term(vis, unit_model(vis), SolveSpec(kind="G", solint="inf", combine="scan",
                                                                  calmode="p", refant=ref, minsnr=params["minsnr"])))
    best = max(snr, key=snr.get)
    spwmap = {s: (s if v >= threshold else best) for s, v in snr.items()}
    for s, m in spwmap.items():
        if m != s:
            qa.note(f"spw {s}: phase SNR {snr[s]:.1f} per {solint} is below {threshold:g}; its phases come "
                    f"from spw {m} (SNR {snr[m]:.1f}) with the spw phase offsets applied.")
    qa.add(best_phase_snr(best, snr[best], threshold, solint, [field_name(ctx, f) for f in phase_ids]))
    ctx["spwphaseup"] = {"spwmap": {str(k): v for k, v in spwmap.items()}, "snr": {str(k): v for k, v in snr.items()},
                         "phasesnr": threshold, "solint": solint}
    save_table(io, ctx, "spwphaseup", offsets, ms_path)
    register(ctx, "spwphaseup", "G", "nearest", "all", calwt=False)
    solution_qa(qa, offsets, "spw phase offset", ctx, "spwphaseup")
    return qa


# ------------------------------------------------------------------ fluxscale

def derive_flux(g: CalSolutions, ref_ids: list, fid: int, clip: float = 5.0):
    """Flux of field fid in units of the 1 Jy model: mean over antennas and
    correlations of (<|g_field|> / <|g_ref|>)^2, after rejecting outliers."""
    amp = np.abs(g.cparam[:, 0, :])
    ok = ~g.flag[:, 0, :]
    ratios = []
    for a in np.unique(g.antenna):
        for p in range(amp.shape[1]):
            r = (g.antenna == a) & ok[:, p]
            ref = r & np.isin(g.field_id, ref_ids)
            tr = r & (g.field_id == fid)
            if ref.any() and tr.any():
                ratios.append((amp[tr, p].mean() / amp[ref, p].mean()) ** 2)
    ratios = np.array(ratios)
    if len(ratios) < 3:
        return None
    med = np.median(ratios)
    mad = robust_sigma(ratios) or 1e-12
    keep = np.abs(ratios - med) <= clip * mad
    r = ratios[keep]
    return float(r.mean()), float(r.std(ddof=1) / np.sqrt(len(r))), int(len(r)), int((~keep).sum())


@metric("fluxscale.antennas", "whether a calibrator's flux can be derived in a spw: 0.3 when fewer than 3 "
        "antenna gain ratios (to the flux calibrator's) are left")
def too_few_antennas(name: str, spw: int) -> Score:
    return Score(0.3, f"{name} spw {spw}: too few antennas to derive a flux.")


@metric("fluxscale.snr", "a derived flux over its error: 0.5 below 10")
def derived_flux_snr(name: str, spw: int, snr: float) -> Score | None:
    if snr < 10:
        return Score(0.5, f"{name} spw {spw}: derived flux SNR only {snr:.1f}.")
    return None


def fluxscale_tables(ctx: dict) -> list:
    if not ctx.get("fluxscale"):
        return []
    return [{"title": "Derived flux densities", "header": ["Field", "spw", "Flux (Jy)", "Error (Jy)", "N"],
             "rows": [[r["field"], r["spw"], f"{r['flux_jy']:.4f}", f"{r['flux_err_jy']:.4f}", r["n"]]
                      for r in ctx["fluxscale"]]}]


@stage("fluxscale", service="calibrator", topic="Calibration", qa=(too_few_antennas, derived_flux_snr),
       tables=fluxscale_tables,
       reads=("fields", "observation", "partitions", "models", "setjy", "caltables", "ms_name"),
       writes=("fluxscale", "models", "flux_csv_key"), params=(
           Param("clip", float, 5.0, "gain ratios beyond this many robust sigmas are left out", min=0.0),))
def fluxscale(ctx: dict, params: dict, io: StageIO) -> QA:
    """Transfer the flux scale from the flux calibrator to the other calibrators."""
    qa = QA()
    ref_ids = require_intent(ctx, "FLUX", "fluxscale")
    transfer = [f for f in calibrator_ids(ctx) if f not in ref_ids]
    results, scaled, ms_path = [], [], None
    for part in ctx["partitions"]:
        g = load_table(io, ctx, "gaincal", part["spw"])
        ms_path = io.fetch_meta(part["meta"])
        freq = float(g.freq[0])
        cp = g.cparam.copy()
        for fid in transfer:
            res = derive_flux(g, ref_ids, fid, params["clip"])
            name = field_name(ctx, fid)
            if res is None:
                qa.add(too_few_antennas(name, part["spw"]))
                continue
            flux, err, n, rejected = res
            results.append({"field": name, "field_id": fid, "spw": part["spw"], "freq_hz": freq,
                            "flux_jy": flux, "flux_err_jy": err, "n": n, "rejected": rejected})
            cp[g.field_id == fid] /= np.sqrt(flux)
            io.log("flux density of %s in spw %d: %.4f +- %.4f Jy (N = %d, %d rejected)",
                   name, part["spw"], flux, err, n, rejected)
            snr = flux / err if err > 0 else np.inf
            qa.add(derived_flux_snr(name, part["spw"], snr))
            qa.note(f"{name} spw {part['spw']}: {flux:.4f} +- {err:.4f} Jy.")
        scaled.append(CalSolutions(g.kind, g.spw, g.freq, g.time, g.interval, g.field_id, g.scan, g.antenna,
                                   cp, g.flag, g.snr, g.refant))
    ctx["fluxscale"] = results
    # The derived fluxes become the models of those fields (spectral index
    # fitted when several spws were measured), as hifa_gfluxscale does.
    for fid in transfer:
        rows = [r for r in results if r["field_id"] == fid]
        if not rows:
            continue
        f = np.array([r["freq_hz"] for r in rows])
        s = np.array([r["flux_jy"] for r in rows])
        spix = float(np.polyfit(np.log(f), np.log(s), 1)[0]) if len(rows) > 1 and np.ptp(f) > 0 else 0.0
        ctx["models"][str(fid)] = {"kind": "manual", "flux_jy": float(np.exp(np.mean(np.log(s)))),
                                   "ref_freq_hz": float(np.exp(np.mean(np.log(f)))), "spix": spix,
                                   "origin": "fluxscale"}
    save_table(io, ctx, "fluxscale", scaled, ms_path)
    # flux.csv in ALMA's columns: the flux calibrators' models and the derived fluxes
    rows = [{"field": r["field"], "spw": r["spw"], "flux_jy": r["flux_jy"], "spix": 0.0,
             "comment": f"setjy model ({r['model']})"} for r in ctx.get("setjy", [])]
    rows += [{"field": r["field"], "spw": r["spw"], "flux_jy": r["flux_jy"],
              "spix": ctx["models"][str(r["field_id"])]["spix"],
              "comment": f"fluxscale {r['flux_err_jy']:.6f} Jy error, {r['n']} antennas"} for r in results]
    entry = io.put_bytes(fluxcsv.write(rows, ctx.get("ms_name", "ms")).encode(), "flux.csv", "text/csv")
    ctx["flux_csv_key"] = entry["key"]
    return qa


# ------------------------------------------------------------------ applycal

# samples (rows x channels x correlations) of the calibrators that applycal's plots show
PLOT_SAMPLES = 5_000_000


@metric("applycal.newly_flagged", "the fraction of the data applycal flagged (no solutions for them): "
        "1 - fraction above 5%", unit="fraction")
def newly_flagged(newly: float) -> Score | None:
    if newly > 0.05:
        return Score(1 - newly, f"applycal flagged {newly:.1%} more data (no solutions for them).")
    return None


@stage("applycal", service="calibrator", topic="Calibration", qa=(newly_flagged,),
       reads=("fields", "observation", "partitions", "callibrary", "caltables"), writes=("partitions", "flag_summary"),
       params=(Param("calwt", bool, True, "scale the weights by the gains"),))
def applycal(ctx: dict, params: dict, io: StageIO) -> QA:
    """Apply the calibration library to every field: CORRECTED_DATA.

    The corrected visibilities are not written (decision 0021): the store keeps the
    product of the tables' gains at each (time, field) of the data, per antenna and
    channel, and the partition's CORRECTED_DATA reads as its DATA divided by them. This
    stage writes those gains, the flags (CASA's calflagstrict) and the weights (calwt),
    and reads no visibility but the calibrators' sample its plots show."""
    qa = QA()
    if not ctx["callibrary"]:
        raise StageError("applycal: the calibration library is empty; run bandpass and timegaincal first")
    new_parts, flagged_before, flagged_after, total = [], 0, 0, 0
    calibrators = list(calibrator_ids(ctx))
    for part in ctx["partitions"]:
        p = io.vis(part)
        applies = apply_for(ctx, io, part["spw"])
        for a in applies:
            a.calwt = a.calwt and params["calwt"]
        # the (time, field) pairs of the data, in time order: a row block's pairs are a range
        gains = p.calibration_writer()
        windows = GainWindows(gains.field_ids, gains.times, applies, gains.nant, p.nchan, p.ncorr, gains.put)
        counts = FlagCounts(len(ctx["observation"]["antennas"]))
        # in row blocks of flags and weights: memory stays at a few chunks whatever the EB
        for blk in p.blocks(data=False, block_chunks=4):
            bp = gains.pair_of_row[blk.rows].astype(np.int64)
            lo, hi = int(bp.min()), int(bp.max()) + 1
            flags, weights = flags_and_weights(blk, bp - lo, *windows.get(lo, hi))
            io.count_visibilities(flags.size)
            flagged_before += int(blk.flag.sum())
            flagged_after += int(flags.sum())
            total += flags.size
            p.write_flags(blk.rows, flags, before=blk.flag)
            p.write("WEIGHT", blk.rows, weights, before=blk.weight)
            counts.add(blk, flags)
        new_parts.append(dict(p.commit(), calibrated=True))
        _record_flag_summary(ctx, counts, part["spw"])
        shown = _plot_rows(p, calibrators)
        if len(shown):
            vis = p.read_rows(shown, "CORRECTED_DATA")
            _plot_calibrated(io, vis, vis.data, vis.flag, ctx, part["spw"])
    ctx["partitions"] = new_parts
    newly = (flagged_after - flagged_before) / max(total, 1)
    qa.add(newly_flagged(newly))
    qa.note(f"Applied {', '.join(e['table'] for e in ctx['callibrary'])}; "
            f"{flagged_after / max(total, 1):.1%} of the data now flagged.")
    return qa


def _plot_rows(p, calibrators: list) -> np.ndarray:
    """The calibrators' rows applycal's plots show: those of every k-th row chunk, k such
    that they hold at most PLOT_SAMPLES samples (whole chunks: a sample of scattered rows
    would read every chunk)."""
    rows = p.select(calibrators, cross_only=True)
    k = max(1, int(np.ceil(len(rows) * p.nchan * p.ncorr / PLOT_SAMPLES)))
    return rows[(rows // p.chunk_rows) % k == 0]


def _plot_calibrated(io, vis, corrected, flags, ctx, spw):
    """Calibrated amplitude and phase of the calibrators vs time, frequency and uv
    distance (colours: calibrators). Flagged and non-finite visibilities are left out
    of every average (nanmean), so a few NaN rows no longer blank the plot; a plot
    left with no finite data at all raises EmptyPlotError."""
    cross = vis.ant1 != vis.ant2
    fids = [f for f in calibrator_ids(ctx) if (cross & (vis.field_id == f)).any()]
    v = np.where(flags | ~np.isfinite(corrected), np.nan, corrected)          # (nrow, nchan, ncorr)
    t_h = (vis.time - vis.time.min()) / 3600
    uvdist = np.hypot(vis.uvw[:, 0], vis.uvw[:, 1])
    fig, axes = plt.subplots(2, 3, figsize=(12, 5.5), sharey="row")
    finite = False
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN slices: rows that are all flagged
        per_row = np.nanmean(v, axis=(1, 2))                                  # vector average over channels
        for i, fid in enumerate(fids):
            r = cross & (vis.field_id == fid)
            per_chan = np.nanmean(v[r], axis=(0, 2))
            ok = np.isfinite(per_row[r])
            finite |= bool(ok.any())
            label = field_name(ctx, int(fid)) + ("" if ok.any() else " (all flagged)")
            step = max(1, int(ok.sum()) // 20000)          # bounded plot: at most ~20000 points a field
            for row, f in ((0, np.abs), (1, lambda z: np.degrees(np.angle(z)))):
                axes[row, 0].plot(t_h[r][ok][::step], f(per_row[r][ok][::step]), ".", ms=1, color=f"C{i}",
                                  label=label if row == 0 else None)
                axes[row, 1].plot(vis.freq / 1e9, f(per_chan), "-", lw=0.8, color=f"C{i}")
                axes[row, 2].plot(uvdist[r][ok][::step], f(per_row[r][ok][::step]), ".", ms=1, color=f"C{i}")
    if not finite:
        plt.close(fig)
        require_finite(f"applycal plot of spw {spw}", [])
    axes[0, 0].set_ylabel("amplitude (Jy)")
    axes[1, 0].set_ylabel("phase (deg)")
    for ax, x in zip(axes[1], ("hours", "frequency (GHz)", "uv distance (m)")):
        ax.set_xlabel(x)
    axes[0, 0].legend(markerscale=6, fontsize=7)
    fig.suptitle(f"Calibrated calibrators, spw {spw}: amplitude and phase vs time, frequency, uv distance")
    io.plot(fig, f"applycal_spw{spw}.png")


class FlagCounts:
    """Flagged and total cross-correlation samples per field and per antenna, summed over
    applycal's row blocks."""

    def __init__(self, nant: int):
        self.nant = nant
        self.field: dict = {}
        self.ant = np.zeros((2, nant))

    def add(self, vis, flags) -> None:
        cross = vis.ant1 != vis.ant2
        nflag = flags[cross].sum(axis=(1, 2)).astype(float)
        per_row = float(flags[0].size) if len(flags) else 0.0
        for f in np.unique(vis.field_id[cross]):
            r = vis.field_id[cross] == f
            acc = self.field.setdefault(int(f), [0.0, 0.0])
            acc[0] += nflag[r].sum()
            acc[1] += r.sum() * per_row
        for a in (vis.ant1[cross], vis.ant2[cross]):
            self.ant[0] += np.bincount(a, nflag, self.nant)
            self.ant[1] += np.bincount(a, minlength=self.nant) * per_row


def _record_flag_summary(ctx, counts: FlagCounts, spw):
    """The flagged fraction of the cross-correlations per field and per antenna in this
    spw after applycal, for the WebLog's flagging summary (ctx['flag_summary'])."""
    fields = {field_name(ctx, f): float(n / tot) for f, (n, tot) in sorted(counts.field.items()) if tot > 0}
    ants = ctx["observation"]["antennas"]
    per_ant = {ants[a]["name"]: float(counts.ant[0, a] / counts.ant[1, a])
               for a in range(counts.nant) if counts.ant[1, a] > 0}
    ctx.setdefault("flag_summary", {})[str(spw)] = {"fields": fields, "antennas": per_ant}
