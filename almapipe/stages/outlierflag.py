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
import warnings

import numpy as np
from astropy.stats import mad_std

from .base import (CAL_READS, QA, SOLINT, Param, Score, StageError, StageIO, field_name, metric, require_intent,
                   stage)
from .calibration import preapply, read_averaged
from ..heuristics.callibrary import calibrator_ids, field_models, refant_id
from ..heuristics.robust import robust_centre_sigma
from ..platform.spill import ChannelSlices
from .flagging import parse_template, template_mask
from ..calibration.caltable import CalSolutions
from ..calibration.terms import SolveSpec, solve_term, unit_model


def _robust(x: np.ndarray, floor: float) -> tuple[float, float]:
    return robust_centre_sigma(x, floor)


# ------------------------------------------------------------------ gainflag

def relative_amplitudes(g: CalSolutions) -> np.ndarray:
    """(nrow, ncorr) gain amplitudes divided by the array's median at the same time,
    field and correlation (NaN where flagged): what gain_outliers tests and the plot shows."""
    amp = np.where(g.flag[:, 0, :], np.nan, np.abs(g.cparam[:, 0, :]))       # (nrow, ncorr)
    rel = np.full_like(amp, np.nan)
    keys = np.stack([g.time, g.field_id], axis=1)
    _, slot = np.unique(keys, axis=0, return_inverse=True)
    slot = slot.ravel()
    for s in np.unique(slot):
        r = slot == s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # a time with all gains flagged
            med = np.nanmedian(amp[r], axis=0)
        if np.isfinite(med).any():
            rel[r] = amp[r] / med
    return rel


def gain_outliers(g: CalSolutions, nsigma: float = 4.0, min_factor: float = 2.0,
                  rms_factor: float = 3.0, nsigma_rms: float = 6.0) -> dict:
    """Antennas whose gains stand out, with the reason: antenna id -> text.

    Amplitudes are first divided by the array's median at the same time, field and
    correlation (so a field's model flux and the atmosphere drop out). Per antenna:
    m = the median of these ratios, r = their rms about m, relative to m. An
    antenna is an outlier when log m differs from the array's median of log m by more than
    nsigma robust sigmas (1.4826 MAD) and by more than a factor min_factor (a small
    array's antennas differ by 10-30 %, which calibration handles), or when r
    exceeds the array's median r by nsigma_rms sigmas and is rms_factor times it, and is
    rms_factor times the scatter the solutions' SNR explains (an antenna seeing a weak
    calibrator at low SNR scatters, and is not broken)."""
    rel = relative_amplitudes(g)
    snr = np.where(g.flag[:, 0, :], np.nan, g.snr[:, 0, :])
    med_a, rms_a, chi_a = {}, {}, {}
    for a in np.unique(g.antenna):
        mine = g.antenna == a
        ok = np.isfinite(rel[mine]) & np.isfinite(snr[mine]) & (snr[mine] > 0)
        x, s = rel[mine][ok], snr[mine][ok]
        if len(x):
            med_a[int(a)] = float(np.median(x))
            rms_a[int(a)] = float(np.sqrt(np.mean((x - med_a[int(a)]) ** 2)) / max(med_a[int(a)], 1e-12))
            # the scatter the solutions' own noise explains: an amplitude of SNR s scatters
            # by about 1/s; on a weak calibrator that is ten per cent and more per integration
            chi_a[int(a)] = float(np.sqrt(np.mean(((x - med_a[int(a)]) / max(med_a[int(a)], 1e-12) * s) ** 2)))
    if len(med_a) < 4:                     # too few antennas to say which is odd
        return {}
    out = {}
    # gains are factors: compared in log, a third and three times are equally odd
    logs = {a: np.log(max(m, 1e-6)) for a, m in med_a.items()}
    centre, sigma = _robust(np.array(list(logs.values())), 0.01)
    for a, lm in logs.items():
        ratio = float(np.exp(lm - centre))
        if abs(lm - centre) > nsigma * sigma and abs(lm - centre) > np.log(min_factor):
            out[a] = f"median gain {ratio:.2f} x the array's"
    rc, rs = _robust(np.array(list(rms_a.values())), 0.005)
    for a, r in rms_a.items():
        if a not in out and r > rc + nsigma_rms * rs and r > rms_factor * rc and chi_a[a] > rms_factor:
            out[a] = f"gain amplitude scatter {r:.1%} vs the array's {rc:.1%}"
    return out


@metric("gainflag.antennas_flagged", "antennas flagged for outlier gains in the spw with the most: 1 - their "
        "share of the antennas with data")
def gain_outlier_antennas(worst: int, n_with_data: int, n_spws: int, evidence: str = "") -> Score | None:
    """worst: the most antennas flagged in one spw; n_spws: the spws with any;
    evidence: the per-antenna plot of that spw."""
    if worst:
        return Score(1 - worst / n_with_data, f"Antennas with outlier gains flagged in {n_spws} spw(s).",
                     evidence=evidence)
    return None


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

def _bin_outliers(amp: np.ndarray, ok: np.ndarray, bins: np.ndarray, nbin: int, nhi: float, nlo: float,
                  min_samples: int) -> np.ndarray:
    """Samples (nrow, nchan, ncorr) beyond the thresholds of their bin, per channel and
    correlation: above median + nhi sigma or below median - nlo sigma."""
    out = np.zeros(amp.shape, bool)
    for b in range(nbin):
        r = bins == b
        if not r.any():
            continue
        a = np.where(ok[r], amp[r], np.nan)
        n = np.sum(ok[r], axis=0)
        with np.errstate(all="ignore"):
            med = np.nanmedian(a, axis=0)
            sig = mad_std(a, axis=0, ignore_nan=True)
        usable = (n >= min_samples) & (sig > 0)
        hi = a > med + nhi * sig
        lo = a < med - nlo * sig
        out[r] = (hi | lo) & usable[None]
    return out


def uv_bins(uvdist: np.ndarray, nbin: int) -> tuple[np.ndarray, np.ndarray]:
    """The two overlapping sets of uv-distance bins of equal counts (uv_outliers): each
    row's bin in the first set (nbin bins) and in the second, shifted by half a bin."""
    nrow = len(uvdist)
    rank = np.empty(nrow, np.int64)
    rank[np.argsort(uvdist, kind="stable")] = np.arange(nrow)
    width = nrow / nbin
    first = np.minimum((rank / width).astype(int), nbin - 1)
    # the shifted set: half-width bins at either end join their neighbour, so no bin is thin
    second = np.clip(((rank + width / 2) / width).astype(int), 1, nbin - 1) - 1
    return first, second


def channel_outliers(amp: np.ndarray, ok: np.ndarray, first: np.ndarray, second: np.ndarray, nbin: int,
                     nhi: float, nlo: float, min_samples: int) -> np.ndarray:
    """Samples that are outliers in both uv bins that hold them. Every statistic is per
    channel and correlation, so any slice of channels gives the same answer as the whole."""
    return _bin_outliers(amp, ok, first, nbin, nhi, nlo, min_samples) & \
        _bin_outliers(amp, ok, second, nbin - 1, nhi, nlo, min_samples)


def uv_outliers(amp: np.ndarray, flag: np.ndarray, uvdist: np.ndarray, nhi: float = 12.0, nlo: float = 13.0,
                nbin: int = 10, min_samples: int = 20, row_fraction: float = 0.5) -> np.ndarray:
    """Outlier samples of one field's calibrated amplitudes (nrow, nchan, ncorr) against
    uv distance (m): rows are cut into nbin bins of equal counts,
    and again into bins shifted by half a bin, so every sample lies in two bins; it
    is an outlier when it is one in both. A row with more than row_fraction of its
    unflagged samples outliers is flagged whole (a burst spoils all channels)."""
    ok = ~flag
    if len(uvdist) < 2 * min_samples:
        return np.zeros(flag.shape, bool)
    first, second = uv_bins(uvdist, nbin)
    out = channel_outliers(amp, ok, first, second, nbin, nhi, nlo, min_samples)
    frac = out.sum(axis=(1, 2)) / np.maximum(ok.sum(axis=(1, 2)), 1)
    out[frac > row_fraction] = True
    return out & ok


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
        m = template_mask(vis, cmd, ctx["observation"]["antennas"], ctx["fields"], spw)
        added += int((m & ~flag).sum())
        flag |= m
    return flag, added


def _flag_targets_in(p, targets: list, commands: list, ctx: dict, params: dict, io: StageIO, spill_dir: str,
                     counts: dict, per_field: dict) -> bool:
    """flagtargets on one partition with memory bounded by SLICE_BYTES, whatever its size.
    Pass 1 reads the corrected data once in row blocks, applies the template and spills
    amplitudes (float32) and flags channel-major to local disk; pass 2 finds the outliers
    one channel slice at a time (uv_outliers' statistics are per channel, its row rule
    needs only per-row counts); pass 3 reads the flags again in the same row blocks and
    writes the new ones. Whether anything changed is the return value."""
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
            io.visibilities += vis.data.size
            counts["before"] += int(vis.flag.sum())
            counts["samples"] += vis.flag.size
            flag, added = _with_template(vis, commands, ctx, p.spw)
            counts["template"] += added
            changed |= added > 0
            spill.write("amp", at, np.abs(vis.data).astype(np.float32))
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
            flag, _ = _with_template(vis, commands, ctx, p.spw)
            out = (spill.read_rows("out", at, at + n) | whole[at:at + n, None, None]) & ~flag
            at += n
            if out.any():
                for fid in np.unique(vis.field_id[out.any(axis=(1, 2))]):
                    o = out[vis.field_id == fid]
                    f = found.setdefault(int(fid), [0, 0])
                    f[0] += int(o.sum())
                    f[1] += int(o.any(axis=(1, 2)).sum())
                flag |= out
            if (flag != vis.flag).any():
                p.write_flags(vis.rows, flag)
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


@stage("flagtargets", service="calibrator", topic="Flagging", qa=(newly_flagged_targets,),
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
