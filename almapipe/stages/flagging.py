"""flagdata (calibrator service): deterministic flags and flag templates.

Flags autocorrelations, exact zeros, shadowed antennas and whatever a flag
template (CASA flagdata list syntax) names. Reports the flagged fraction per
reason, as hifa_flagdata does.
"""
from __future__ import annotations

import numpy as np

from .base import QA, Param, Score, StageIO, metric, stage
from ..heuristics.callibrary import calibrator_ids
from ..heuristics.channels import spike_channels
from ..heuristics.flagging import FlagSelection, parse_template, shadow_mask, template_selection
from ..msio import ms as msio
from ..msio.listobs import intents_of_modes
from ..report.flagsummary import flag_summary_tables


@metric("flagdata.flagged_fraction", "the fraction of the data flagged beyond autocorrelations, unused "
        "intents, band edges, online flags and earlier flags (hifa_flagdata): 1 - fraction above 5%, 0 above 60%",
        unit="fraction")
def flagged_fraction(extra: float) -> Score | None:
    if extra > 0.6:
        return Score(0.0, f"{extra:.0%} of the data flagged beyond autocorrelations.")
    if extra > 0.05:
        return Score(1.0 - extra, f"{extra:.1%} of the data flagged beyond autocorrelations.")
    return None


def flagdata_tables(ctx: dict) -> list:
    """What flagdata flagged by reason, then the flagging summary of the run
    (per field, spw and antenna after applycal; what each flagging stage flagged)."""
    if not ctx["flags"].get("flagdata"):
        return []
    fr = ctx["flags"]["flagdata"]["fractions"]
    return [{"title": "Flagged fraction", "header": ["Reason", "Fraction"],
             "rows": [[k, f"{v:.4f}"] for k, v in fr.items()]}] + flag_summary_tables(ctx)


def flagdata_reasons(ctx: dict) -> list:
    return [f"{k}: {v:.2%} of the data"
            for k, v in (ctx.get("flags", {}).get("flagdata") or {}).get("fractions", {}).items()]


@stage("flagdata", service="calibrator", topic="Flagging", qa=(flagged_fraction,), tables=flagdata_tables,
       flag_reasons=flagdata_reasons,
       reads=("user", "observation", "fields", "partitions", "flags"), writes=("partitions", "flags"), params=(
           Param("template", str, "", "flag commands (CASA flagdata syntax); empty: the run's flag template"),
           Param("online", bool, True, "apply the online flags (FLAG_CMD)"),
           Param("autocorr", bool, True, "flag the autocorrelations"),
           Param("zeros", bool, True, "flag exact zeros"),
           Param("unused_intents", list, ["ATMOSPHERE", "POINTING", "SIDEBAND", "FOCUS"],
                 "scan intents not used for calibration, flagged"),
           Param("edge_fraction", float, 0.0, "fraction of each spw's channels flagged at each edge",
                 min=0.0, max=0.49),
           Param("shadow", bool, True, "flag shadowed antennas")))
def flagdata(ctx: dict, params: dict, io: StageIO) -> QA:
    qa = QA()
    template = params["template"] or ctx["user"].get("flag_template") or ""
    commands = parse_template(template) if template else []
    online = []
    if params["online"] and ctx["partitions"]:
        # ALMA's online flags (FLAG_CMD): the same command syntax as a template
        rows = msio.online_flag_commands(io.fetch_meta(ctx["partitions"][0]["meta"]))
        online = parse_template("\n".join(r["command"] for r in rows))
        for cmd, r in zip(online, rows):
            cmd.setdefault("reason", r["reason"])
    ants = ctx["observation"]["antennas"]
    diam = np.array([a["diameter_m"] for a in ants])
    summary = {"autocorr": 0, "zeros": 0, "intents": 0, "edges": 0, "shadow": 0, "online": 0, "template": 0,
               "before": 0, "total": 0, "samples": 0}
    state_intents = [intents_of_modes([m]) for m in msio.state_intents(io.fetch_meta(ctx["partitions"][0]["meta"]))] \
        if ctx["partitions"] else []
    new_parts = []
    unused = set(params["unused_intents"])
    bad_states = [i for i, its in enumerate(state_intents) if its and its <= unused] if unused else []
    for part in ctx["partitions"]:
        p = io.vis(part)
        shadowed = None
        if params["shadow"]:
            # shadowing needs every baseline of an integration at once: computed on the
            # per-row arrays of the whole partition, which a row block may cut through
            shadowed = shadow_mask(p.index("TIME"), p.index("ANTENNA1"), p.index("ANTENNA2"),
                                   p.row_array("UVW"), diam)
        # clipping zeros needs the data of the rows importdata found zeros in, no other:
        # where it recorded them, the blocks are read without their data
        zero_rows = p.zero_rows() if params["zeros"] else None
        for vis in p.blocks(block_chunks=4, data=params["zeros"] and zero_rows is None):
            io.count_visibilities(vis.flag.size)
            flag = vis.flag.copy()
            summary["before"] += int(np.count_nonzero(flag))
            summary["samples"] += flag.size

            # each reason flags a FlagSelection (rows, channels, correlations): it costs what
            # it selects, not a mask of the block's size
            def add(sel: FlagSelection, reason):
                summary[reason] += sel.flag(flag)

            if params["autocorr"]:
                add(FlagSelection(vis.ant1 == vis.ant2), "autocorr")
            if params["zeros"]:
                zero = _zeros(p, vis, zero_rows)
                new = zero & ~flag
                summary["zeros"] += int(np.count_nonzero(new))
                flag |= zero
            if bad_states:
                add(FlagSelection(np.isin(vis.state_id, bad_states)), "intents")
            edge = params["edge_fraction"]     # ALMA TDM spws: 1/16 of the channels at each edge
            if edge > 0:
                nchan = flag.shape[1]
                n_edge = int(np.ceil(edge * nchan))
                edges = np.zeros(nchan, bool)
                edges[:n_edge] = edges[nchan - n_edge:] = True
                add(FlagSelection(np.ones(len(flag), bool), edges), "edges")
            if shadowed is not None:
                add(FlagSelection(shadowed[vis.rows]), "shadow")
            for cmd in online:
                add(template_selection(vis, cmd, ants, ctx["fields"], part["spw"]), "online")
            for cmd in commands:
                add(template_selection(vis, cmd, ants, ctx["fields"], part["spw"]), "template")
            summary["total"] += int(np.count_nonzero(flag))
            p.write_flags(vis.rows, flag, before=vis.flag)
        new_parts.append(p.commit())
    ctx["partitions"] = new_parts
    n = max(summary["samples"], 1)
    frac = {k: summary[k] / n for k in ("autocorr", "zeros", "intents", "edges", "shadow", "online", "template",
                                        "before", "total")}
    ctx["flags"]["flagdata"] = {"fractions": frac, "commands": commands, "online_commands": online}
    for k, v in frac.items():
        io.log("flagged fraction %s: %.4f", k, v)
    # As hifa_flagdata: the score falls with the fraction flagged beyond autocorrelations.
    extra = frac["total"] - frac["autocorr"] - frac["intents"] - frac["edges"] - frac["before"] - frac["online"]
    qa.add(flagged_fraction(extra))
    qa.note(f"Flagged in total {frac['total']:.1%} (autocorrelations {frac['autocorr']:.1%}, intents not used "
            f"for calibration {frac['intents']:.1%}, band edges {frac['edges']:.1%}, zeros {frac['zeros']:.2%}, "
            f"shadowing {frac['shadow']:.2%}, online flags {frac['online']:.2%} ({len(online)} commands), "
            f"template {frac['template']:.2%}).")
    return qa


def _zeros(p, vis, zero_rows) -> np.ndarray:
    """Where the block's visibilities are exactly zero (both parts: |V| = 0 without the
    square roots). With importdata's zero rows, only those rows' data are read."""
    if zero_rows is None:
        return vis.data == 0
    zero = np.zeros(vis.flag.shape, bool)
    if not len(vis.rows):
        return zero
    # the list's part within the block's rows (ascending both): an antenna whose data are
    # all zero puts a large part of the partition in the list
    lo, hi = np.searchsorted(zero_rows, [vis.rows[0], vis.rows[-1] + 1])
    hit = np.isin(vis.rows, zero_rows[lo:hi], assume_unique=True)
    if hit.any():
        zero[hit] = p.rows_of("DATA", vis.rows[hit]) == 0
    return zero


def weighted_spectrum(vis: msio.Vis) -> tuple[np.ndarray, np.ndarray]:
    """(sum of weight x data, sum of weight) per channel over the cross-correlations'
    unflagged samples: summed over row blocks, their ratio is the averaged spectrum."""
    w = np.where(vis.flag, 0, vis.weight[:, None, :])
    w = w * (vis.ant1 != vis.ant2)[:, None, None]
    return (w * vis.data).sum(axis=(0, 2)), w.sum(axis=(0, 2))


def outlier_channels(wsum: np.ndarray, w: np.ndarray, nsigma: float = 8.0) -> np.ndarray:
    """Channels (nchan,) that spike in the time- and baseline-averaged amplitude spectrum
    (weighted_spectrum's sums)."""
    spec = np.abs(wsum / np.maximum(w, 1e-30))
    return spike_channels(spec, w > 0, nsigma)


@metric("rawflagchans.channel_fraction", "the channels flagged as outliers, as a fraction of the science "
        "spws' channels: 0.6 above 10%", unit="fraction")
def flagged_channels(nflag: int, total: int) -> Score | None:
    if nflag > 0.1 * max(total, 1):
        return Score(0.6, f"{nflag} channels flagged as outliers: more than 10% of the band.")
    return None


def rawflagchans_outliers(ctx: dict, link) -> list:
    """Home's triage: each spw with outlier channels flagged."""
    return [{"what": f"spw {spw}", "why": f"{len(ch)} outlier channel(s) flagged (rawflagchans)",
             "href": link("rawflagchans"), "also": ""}
            for spw, ch in (ctx.get("flags", {}).get("rawflagchans") or {}).items()]


def rawflagchans_reasons(ctx: dict) -> list:
    return [f"spw {spw}: channels {', '.join(map(str, ch))} stand out in the raw spectra"
            for spw, ch in (ctx.get("flags", {}).get("rawflagchans") or {}).items()]


@stage("rawflagchans", service="calibrator", topic="Flagging", qa=(flagged_channels,),
       outliers=rawflagchans_outliers, flag_reasons=rawflagchans_reasons,
       reads=("fields", "observation", "partitions", "flags"), writes=("partitions", "flags"), params=(
           Param("nsigma", float, 8.0, "robust sigmas of a spiking channel", min=0.0),))
def rawflagchans(ctx: dict, params: dict, io: StageIO) -> QA:
    """Flag channels that stand out in the calibrators' raw spectra, in every field (hif_rawflagchans)."""
    qa = QA()
    found, new_parts = {}, []
    for part in ctx["partitions"]:
        p = io.vis(part)
        wsum, w = np.zeros(p.nchan, complex), np.zeros(p.nchan)
        for cal in p.blocks(field_ids=calibrator_ids(ctx), block_chunks=4):
            io.count_visibilities(cal.data.size)
            a, b = weighted_spectrum(cal)
            wsum += a
            w += b
        bad = outlier_channels(wsum, w, params["nsigma"])
        if bad.any():
            for vis in p.blocks(data=False, block_chunks=4):    # flags are all it changes
                p.write_flags(vis.rows, vis.flag | bad[None, :, None], before=vis.flag)
            part = p.commit()
            found[part["spw"]] = np.flatnonzero(bad).tolist()
            qa.note(f"spw {part['spw']}: flagged channel(s) {', '.join(map(str, found[part['spw']]))}.")
        new_parts.append(part)
    ctx["partitions"] = new_parts
    ctx["flags"]["rawflagchans"] = found
    if not found:
        qa.note("No outlier channels.")
    nflag = sum(len(v) for v in found.values())
    total = sum(s["nchan"] for s in ctx["observation"]["spws"] if any(p["spw"] == s["id"] for p in ctx["partitions"]))
    qa.add(flagged_channels(nflag, total))
    return qa
