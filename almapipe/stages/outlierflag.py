"""Outlier flagging after the flux scale (calibrator service): gainflag and flagtargets.

* gainflag (hif_gainflag): antennas whose gain amplitudes on the calibrators stand
  out from the array's, per spw: a median far from the others' (a mis-set
  attenuator, a bad receiver in one band) or an amplitude scatter in time far
  larger (a loose connection). The antenna's data in that spw are flagged.
* flagtargets (hifa_flagtargets, with the outlier test ALMA added for Cycle 5 as
  hif_correctedampflag on the targets): the targets' flag template, then calibrated
  target amplitudes that are outliers in their uv-distance bins. A target is not a
  point source, so amplitudes are compared only with those at similar uv distance;
  the bins overlap, and a sample is an outlier only if it is one in both bins that
  hold it, at a high threshold (+12 / -13 sigma), as ALMA's pipeline documents.

The kernels (gain_outliers, uv_outliers) work on arrays; the stages only read,
call them and write flags.
"""
from __future__ import annotations

import tempfile

import numpy as np

from .base import (CAL_READS, QA, SOLINT, Param, Score, StageError, StageIO, field_name, metric, require_intent,
                   stage)
from .calibration import preapply, read_averaged
from ..heuristics.callibrary import calibrator_ids, field_models, refant_id
from ..heuristics.outliers import channel_outliers, gain_outliers, relative_amplitudes, uv_bins
from ..platform.spill import ChannelSlices
from ..heuristics.flagging import parse_template, template_selection
from ..calibration.caltable import CalSolutions
from ..calibration.terms import SolveSpec, solve_term, unit_model


# ------------------------------------------------------------------ gainflag


@metric("gainflag.antennas_flagged", "antennas flagged for outlier gains in the spw with the most: 1 - their "
        "share of the antennas with data")
def gain_outlier_antennas(worst: int, n_with_data: int, n_spws: int, evidence: str = "") -> Score | None:
    """worst: the most antennas flagged in one spw; n_spws: the spws with any;
    evidence: the per-antenna plot of that spw."""
    if worst:
        return Score(1 - worst / n_with_data, f"Antennas with outlier gains flagged in {n_spws} spw(s).",
                     evidence=evidence)
    return None


def gainflag_outliers(ctx: dict, link) -> list:
    """Home's triage: each antenna and spw flagged for outlier gains."""
    return [{"what": f"antenna {a} spw {spw}", "why": "outlier gains: flagged (gainflag)",
             "href": link("gainflag"), "also": ""}
            for spw, ants in (ctx.get("flags", {}).get("gainflag") or {}).items() for a in ants]


def gainflag_reasons(ctx: dict) -> list:
    return [f"spw {spw}: antenna(s) {', '.join(ants)} with outlier gains"
            for spw, ants in (ctx.get("flags", {}).get("gainflag") or {}).items()]


def _plot_gain_outliers(io, g: CalSolutions, antennas: list, spw: int, bad: dict) -> str | None:
    """Each antenna's gain amplitude relative to the array's (relative_amplitudes) vs
    time, one panel per antenna with data: the antennas gainflag flags framed red,
    those without solutions marked. The plot's name, or None when nothing is unflagged."""
    from ..report.plots import antenna_grid, label_panel
    rel = relative_amplitudes(g)
    if not np.isfinite(rel).any():
        return None
    ants = [a for a in antennas if a.get("has_data", True)]
    name = f"gainflag_spw{spw}.png"
    fig, axes = antenna_grid(len(ants), f"gain amplitude / the array's median vs hours, spw {spw}, per antenna "
                                        "(colours: correlations); red: flagged as outliers")
    hours = (g.time - g.time.min()) / 3600
    for ax, a in zip(axes, ants):
        mine = g.antenna == a["id"]
        for p in range(rel.shape[1]):
            ax.plot(hours[mine], rel[mine, p], ".", ms=1.5, color=f"C{p}")
        ax.axhline(1.0, color="0.6", lw=0.5)
        label_panel(ax, a["name"], "outlier" if a["id"] in bad else
                    "" if np.isfinite(rel[mine]).any() else "flagged")
    io.plot(fig, name)
    return name


@stage("gainflag", service="calibrator", topic="Flagging", qa=(gain_outlier_antennas,),
       outliers=gainflag_outliers, flag_reasons=gainflag_reasons,
       reads=CAL_READS + ("flags",),
       writes=("partitions", "flags"), params=(
           Param("solint", (str, int, float), "int", "gain solution interval", pattern=SOLINT),
           Param("minsnr", float, 3.0, "solutions below this SNR are flagged", min=0.0),
           Param("nsigma", float, 4.0, "robust sigmas of an outlier antenna's gain", min=0.0),
           Param("min_factor", float, 2.0, "and off the median by more than this factor", min=1.0),
           Param("rms_factor", float, 3.0, "scatter test: rms above this factor of the median", min=1.0),
           Param("nsigma_rms", float, 6.0, "scatter test: robust sigmas of an outlier scatter", min=0.0),
           Param("scatter", bool, False, "also flag antennas whose gains scatter (off: the atmosphere does too)")))
def gainflag(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flag antennas whose gains on the calibrators are outliers, per spw (hif_gainflag):
    gains solved per integration with the library so far applied (see gain_outliers)."""
    qa = QA()
    cal = calibrator_ids(ctx)
    ants = ctx["observation"]["antennas"]
    found, plots, new_parts = {}, {}, []
    for part in ctx["partitions"]:
        _, vis = read_averaged(io, part, cal, field_models(ctx, unit_for=cal), preapply(ctx, io, part["spw"]))
        g = solve_term(vis, unit_model(vis), SolveSpec(kind="G", solint=params["solint"], calmode="ap",
                                                       refant=refant_id(ctx), minsnr=params["minsnr"]))
        # the scatter test is off unless asked for: on the simulated EBs it named good
        # antennas whose per-integration amplitudes vary with the atmosphere the WVR
        # leaves (decorrelation within an integration), not with their electronics
        bad = gain_outliers(g, params["nsigma"], params["min_factor"],
                            params["rms_factor"],
                            params["nsigma_rms"] if params["scatter"] else np.inf)
        plot = _plot_gain_outliers(io, g, ants, part["spw"], bad)
        solved = np.unique(g.antenna[~g.flag.all(axis=(1, 2))])
        io.log("spw %d: gains of %d antennas, outliers: %s", part["spw"], len(solved),
               ", ".join(f"{ants[a]['name']} ({why})" for a, why in sorted(bad.items())) or "none")
        if bad:
            p = io.vis(part)
            p.flag_antennas(sorted(bad))
            part = p.commit()
            found[str(part["spw"])] = [ants[a]["name"] for a in sorted(bad)]
            plots[str(part["spw"])] = plot or ""
            for a, why in sorted(bad.items()):
                qa.note(f"spw {part['spw']}: flagged antenna {ants[a]['name']}: {why}.")
        new_parts.append(part)
    ctx["partitions"] = new_parts
    ctx["flags"]["gainflag"] = found
    n_has = max(sum(a["has_data"] for a in ants), 1)
    worst = max((len(v) for v in found.values()), default=0)
    worst_spw = max(found, key=lambda k: len(found[k]), default=None)
    qa.add(gain_outlier_antennas(worst, n_has, len(found), plots.get(worst_spw, "")))
    if not worst:
        qa.note("No antenna with outlier gains.")
    return qa


# ------------------------------------------------------------------ flagtargets


# memory for one channel slice of a partition's target amplitudes and flags (the spill's
# width); the median per uv bin then costs about three times this
SLICE_BYTES = 256 * 2 ** 20
MIN_SAMPLES = 20          # uv_outliers' default: fewer unflagged samples in a bin, no test
ROW_FRACTION = 0.5        # uv_outliers' default: a row with more outliers is flagged whole


def _with_template(vis, commands: list, ctx: dict, spw: int) -> tuple[np.ndarray, int]:
    """The block's flags with the template's commands applied, and how many they added."""
    flag = vis.flag.copy()
    added = 0
    for cmd in commands:
        added += template_selection(vis, cmd, ctx["observation"]["antennas"], ctx["fields"], spw).flag(flag)
    return flag, added


def _flag_targets_in(p, targets: list, commands: list, ctx: dict, params: dict, io: StageIO, spill_dir: str,
                     counts: dict, per_field: dict) -> bool:
    """flagtargets on one partition with memory bounded by SLICE_BYTES, whatever its size.
    Pass 1 reads the corrected data once in row blocks, applies the template and spills
    amplitudes (float32) and flags channel-major to local disk (kept in memory where one
    slice holds every channel); pass 2 finds the outliers
    one channel slice at a time (uv_outliers' statistics are per channel, its row rule
    needs only per-row counts); pass 3 reads the stored flags again in the same row blocks
    (to see what changed) and writes the spilled ones with the outliers added. Whether anything changed is the return value."""
    rows = p.select(targets)
    if not len(rows):
        return False
    nrow, nchan, ncorr = len(rows), p.nchan, p.ncorr
    width = SLICE_BYTES // max(nrow * ncorr * 6, 1)         # float32 amplitude, flag, outlier
    field_ids = p.index("FIELD_ID")[rows]
    cross = p.index("ANTENNA1")[rows] != p.index("ANTENNA2")[rows]
    uvdist = np.empty(nrow)
    changed = False
    with ChannelSlices(spill_dir, nrow, nchan, ncorr, width) as spill:
        at = 0
        for vis in p.blocks(column="CORRECTED_DATA", field_ids=targets, block_chunks=4):
            n = len(vis.rows)
            io.count_visibilities(vis.data.size)
            counts["before"] += int(vis.flag.sum())
            counts["samples"] += vis.flag.size
            flag, added = _with_template(vis, commands, ctx, p.spw)
            counts["template"] += added
            changed |= added > 0
            spill.write("amp", at, np.abs(vis.data).astype(np.float32, copy=False))
            spill.write("flag", at, flag)
            uvdist[at:at + n] = np.hypot(vis.uvw[:, 0], vis.uvw[:, 1])
            at += n

        # each field's cross-correlation rows and their uv bins
        tested = {}
        for fid in np.unique(field_ids):
            r = np.flatnonzero((field_ids == fid) & cross)
            if len(r) >= 2 * MIN_SAMPLES:
                tested[int(fid)] = (r, *uv_bins(uvdist[r], params["nbins"]))
        n_out, n_ok = np.zeros(nrow, np.int64), np.zeros(nrow, np.int64)
        for i in range(len(spill.bounds)):
            amp, ok = spill.read_slice("amp", i), ~spill.read_slice("flag", i)
            out = np.zeros(ok.shape, bool)
            for r, first, second in tested.values():
                out[r] = channel_outliers(amp[r], ok[r], first, second, params["nbins"], params["nsigma_high"],
                                          params["nsigma_low"], MIN_SAMPLES)
            del amp
            n_out += out.sum(axis=(1, 2))
            n_ok += ok.sum(axis=(1, 2))
            spill.write_slice("out", i, out)
        in_tested = np.zeros(nrow, bool)
        for r, _, _ in tested.values():
            in_tested[r] = True
        whole = in_tested & (n_out / np.maximum(n_ok, 1) > ROW_FRACTION)

        at = 0
        found = {}                                    # field id -> [samples, rows]
        for vis in p.blocks(column="CORRECTED_DATA", field_ids=targets, data=False, block_chunks=4):
            n = len(vis.rows)
            flag = spill.read_rows("flag", at, at + n)          # pass 1's: with the template
            out = (spill.read_rows("out", at, at + n) | whole[at:at + n, None, None]) & ~flag
            at += n
            if out.any():
                for fid in np.unique(vis.field_id[out.any(axis=(1, 2))]):
                    o = out[vis.field_id == fid]
                    f = found.setdefault(int(fid), [0, 0])
                    f[0] += int(o.sum())
                    f[1] += int(o.any(axis=(1, 2)).sum())
                flag = flag | out                                # (the spill's arrays are read-only)
            if (flag != vis.flag).any():
                p.write_flags(vis.rows, flag, before=vis.flag)
    for fid, (n, nrows) in sorted(found.items()):
        counts["outliers"] += n
        name = field_name(ctx, fid)
        per_field[name] = per_field.get(name, 0) + n
        io.log("spw %d %s: %d outlier samples in %d rows", p.spw, name, n, nrows)
    return changed or bool(found)


@metric("flagtargets.newly_flagged", "the fraction of the target data newly flagged (template and amplitude "
        "outliers), as ALMA scores it: 1 - fraction", unit="fraction")
def newly_flagged_targets(newly: float, outliers: int, template: int) -> Score | None:
    """outliers, template: the samples flagged as amplitude outliers and by the template."""
    if newly > 0:
        return Score(1 - newly, f"{newly:.2%} of the target data newly flagged "
                                f"({outliers} amplitude outlier samples, {template} by the template).")
    return None


def flagtargets_reasons(ctx: dict) -> list:
    ft = ctx.get("flags", {}).get("flagtargets") or {}
    if not ft:
        return []
    return [f"template {ft.get('template_fraction', 0):.2%}, amplitude outliers "
            f"{ft.get('outlier_fraction', 0):.2%} of the target data"]


@stage("flagtargets", service="calibrator", topic="Flagging", qa=(newly_flagged_targets,),
       flag_reasons=flagtargets_reasons,
       reads=("user", "fields", "observation", "partitions", "flags"), writes=("partitions", "flags"), params=(
           Param("template", str, "", "flag commands; empty: the run's flagtargets template"),
           Param("nsigma_high", float, 12.0, "robust sigmas above the uv-distance bin's median", min=0.0),
           Param("nsigma_low", float, 13.0, "robust sigmas below it", min=0.0),
           Param("nbins", int, 10, "uv-distance bins", min=1)))
def flagtargets(ctx: dict, params: dict, io: StageIO) -> QA:
    """The targets' flag template (flagtargetstemplate.txt, or params template), then
    outliers of the calibrated target amplitudes against uv distance (uv_outliers)."""
    qa = QA()
    targets = require_intent(ctx, "TARGET", "flagtargets")
    if not all(p.get("calibrated") for p in ctx["partitions"]):
        raise StageError("flagtargets: the data are not calibrated (no CORRECTED_DATA); run applycal first")
    text = params["template"] or ctx["user"].get("flagtargets_template") or ""
    commands = parse_template(text) if text else []
    counts = {"template": 0, "outliers": 0, "samples": 0, "before": 0}
    per_field: dict = {}
    new_parts = []
    for part in ctx["partitions"]:
        p = io.vis(part)
        with tempfile.TemporaryDirectory(dir=io.workdir, prefix="flagtargets-") as spill_dir:
            if _flag_targets_in(p, targets, commands, ctx, params, io, spill_dir, counts, per_field):
                part = p.commit()
        new_parts.append(part)
    ctx["partitions"] = new_parts
    total = max(counts["samples"], 1)
    newly = (counts["template"] + counts["outliers"]) / total
    ctx["flags"]["flagtargets"] = {"template_fraction": counts["template"] / total,
                                   "outlier_fraction": counts["outliers"] / total, "outliers_per_field": per_field,
                                   "commands": len(commands)}
    io.log("targets: %d template command(s) flagged %.4f, outliers %.4f of the samples", len(commands),
           counts["template"] / total, counts["outliers"] / total)
    qa.add(newly_flagged_targets(newly, counts["outliers"], counts["template"]))
    if newly <= 0:
        qa.note("No target data flagged: no template and no amplitude outliers.")
    return qa
