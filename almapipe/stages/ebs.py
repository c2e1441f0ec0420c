"""Execution blocks of an MOUS: how the MOUS run's stages see them, and the flux
consistency check between them (fluxconsistency).

An MOUS is calibrated one EB at a time, each in a run of its own (the stages up to
split); its own run starts from the EBs' merged contexts (gateway.coordinator.
merge_eb_contexts): ``ctx["partitions"]`` and ``ctx["target_partitions"]`` then hold
every EB's partitions, each tagged with its EB (``eb``, ``ms_name``) and the map of its
field ids onto the first EB's (``field_map``), and ``ctx["ebs"]`` holds each EB's
fluxscale results, flags and stage scores. Stages that combine EBs take the partitions
of one spw together (spw_groups) and read them as one Vis (read_group). A single-EB
run has no tags, and every group is one partition.
"""
from __future__ import annotations

import numpy as np

from .base import QA, Param, Score, StageIO, field_ids_with, field_name, metric, stage
from ..heuristics.fluxscale import flux_consistency
from ..msio import ms as msio


def spw_groups(parts: list) -> list:
    """Partitions grouped by spw, in order of first appearance: [[part, ...], ...]."""
    groups = {}
    for p in parts:
        groups.setdefault(p["spw"], []).append(p)
    return list(groups.values())


def eb_field_ids(part: dict, fids) -> list | None:
    """The field ids in this partition's EB of the (first EB's) field ids fids."""
    if fids is None or "field_map" not in part:
        return fids
    wanted = {int(f) for f in fids}
    return sorted(int(e) for e, m in part["field_map"].items() if m in wanted)


def read_member(io: StageIO, part: dict, fields=None, column: str = "DATA", chan: slice | None = None,
                data: bool = True):
    """(VisPartition, Vis) of one EB's partition read from the visibility store (only
    the channels `chan`, when given), field ids mapped onto the first EB's and scan
    numbers made unique across EBs (EB index x 100000). The Vis's rows are the store's
    rows of the partition, so a stage writes back through the VisPartition."""
    vp = io.vis(part)
    vis = _as_first_ebs(vp.read(column=column, field_ids=eb_field_ids(part, fields), chan=chan, data=data), part)
    io.count_visibilities(vis.data.size)
    return vp, vis


def member_blocks(io: StageIO, vp, part: dict, fields=None, column: str = "DATA", data: bool = True,
                  block_chunks: int = 4):
    """read_member in row blocks of the VisPartition vp (io.vis(part)): bounded memory."""
    for vis in vp.blocks(column=column, field_ids=eb_field_ids(part, fields), data=data, block_chunks=block_chunks):
        io.count_visibilities(vis.data.size)
        yield _as_first_ebs(vis, part)


def _as_first_ebs(vis: msio.Vis, part: dict) -> msio.Vis:
    """An MOUS member's rows with the first EB's field ids and scans unique across EBs."""
    if "field_map" in part:
        fmap = {int(k): v for k, v in part["field_map"].items()}
        vis.field_id = np.array([fmap.get(int(f), -1) for f in vis.field_id], int) if len(vis.field_id) else vis.field_id
        vis.scan = vis.scan + 100000 * int(part.get("eb", 0))
    return vis


def read_group(io: StageIO, group, fields=None, column: str = "DATA", chan: slice | None = None,
               data: bool = True) -> msio.Vis:
    """One Vis of a spw from every EB's partition of it (group: a partition, or a list of
    the EBs' partitions of one spw)."""
    members = group if isinstance(group, list) else group.get("members", [group])
    vis = [read_member(io, p, fields, column, chan, data)[1] for p in members]
    try:
        return msio.concat_vis(vis)
    except msio.MSError as exc:
        from .base import StageError
        raise StageError(str(exc)) from exc


def view_name(part: dict, suffix: str) -> str:
    """The name of a view of a partition (``x.spw17.ms`` -> ``x.spw17.<suffix>.ms``): where
    the versions a later stage writes through the view go (runs/<run>/vis/<name>/...). In
    an MOUS run the EBs' partitions may share a name (EBs of one file name): the EB's
    name leads, so each EB's versions have keys of their own."""
    name = part["name"].replace(".ms", f".{suffix}.ms")
    if "eb" in part and not name.startswith(f"{part['ms_name']}."):
        name = f"{part['ms_name']}.{name}"
    return name


def as_group(parts: list) -> dict:
    """A spw's partitions from several EBs as one partition-like entry (its first member's
    keys, and all of them under 'members'); a lone partition stays as it is."""
    return parts[0] if len(parts) == 1 else dict(parts[0], members=parts)


# ------------------------------------------------------------------ fluxconsistency


@metric("fluxconsistency.compared", "whether the EBs' flux scales could be compared (a phase calibrator's flux "
        "measured in two or more EBs): 0.8 when not")
def not_compared() -> Score:
    return Score(0.8, "No phase calibrator flux measured in two or more EBs: flux scales not compared.")


@metric("fluxconsistency.eb_outliers", "EBs whose flux scale is beyond nsigma and tolerance from the EBs' median: "
        "0.6 each")
def eb_outliers(res: dict) -> list:
    """res: flux_consistency's result."""
    return [Score(0.6, f"EB {eb}: flux scale {res['ebs'][eb]['ratio_to_median'] - 1:+.1%} from the EBs' median "
                       f"(beyond {res['nsigma']:g} sigma and {res['tolerance']:.0%}); check its flux calibrator's "
                       f"model.") for eb in res["outliers"]]


def fluxconsistency_tables(ctx: dict) -> list:
    fc = ctx.get("flux_consistency") or {}
    if not fc.get("ebs"):
        return []
    return [{"title": "Flux scale of each EB (phase calibrators against the MOUS's weighted mean)",
             "header": ["EB", "Ratio", "Error", "Factor applied", "Disagrees"],
             "rows": [[eb, f"{s['ratio']:.4f}", f"{s['ratio_err']:.4f}",
                       f"{s['factor']:.4f}" if fc.get("equalized") else "-", "yes" if eb in fc["outliers"] else ""]
                      for eb, s in fc["ebs"].items()]},
            {"title": "Per field and spw", "header": ["EB", "Field", "spw", "Flux (Jy)", "Error (Jy)",
                                                      "Mean (Jy)", "Ratio"],
             "rows": [[r["eb"], r["field"], r["spw"], f"{r['flux_jy']:.4f}", f"{r['flux_err_jy']:.4f}",
                       f"{r['mean_jy']:.4f}", f"{r['ratio']:.4f}"] for r in fc["table"]]}]


def fluxconsistency_outliers(ctx: dict, link) -> list:
    """Home's triage: each EB whose flux scale disagrees with the others'."""
    return [{"what": f"EB {eb}", "why": "flux scale disagrees with the other EBs'", "href": link("fluxconsistency"),
             "also": ""} for eb in (ctx.get("flux_consistency") or {}).get("outliers", [])]


@stage("fluxconsistency", service="calibrator", topic="Calibration", qa=(not_compared, eb_outliers),
       tables=fluxconsistency_tables, outliers=fluxconsistency_outliers,
       reads=("ebs", "fields", "target_partitions"), writes=("flux_consistency", "target_partitions"), params=(
           Param("tolerance", float, 0.03, "EB flux scales within this fraction agree", min=0.0),
           Param("nsigma", float, 3.0, "and beyond this many sigmas disagree", min=0.0),
           Param("equalize", bool, False, "scale each EB's target data to the MOUS's weighted mean")))
def fluxconsistency(ctx: dict, params: dict, io: StageIO) -> QA:
    """Compare the EBs' flux scales through their phase calibrators; name an EB that
    disagrees; with `equalize`, scale each EB's calibrated target data to the MOUS's
    weighted mean (the factors are recorded in the context and in calibration/)."""
    qa = QA()
    ebs = ctx.get("ebs", [])
    if len(ebs) < 2:
        qa.note("One execution block: no flux scales to compare.")
        return qa
    phase = {field_name(ctx, f) for f in field_ids_with(ctx, "PHASE")}
    res = flux_consistency(ebs, phase, float(params["tolerance"]), float(params["nsigma"]))
    if not res["ebs"]:
        qa.add(not_compared())
        ctx["flux_consistency"] = res
        return qa
    for eb, s in res["ebs"].items():
        io.log("EB %s: flux scale %.4f +- %.4f of the MOUS mean", eb, s["ratio"], s["ratio_err"])
        qa.note(f"EB {eb}: phase calibrator fluxes at {s['ratio']:.3f} ± {s['ratio_err']:.3f} of the weighted mean.")
    qa.add(eb_outliers(res))
    if params["equalize"]:
        res["equalized"] = True
        new = []
        for part in ctx["target_partitions"]:
            factor = res["ebs"].get(part.get("ms_name"), {}).get("factor", 1.0)
            if abs(factor - 1) < 1e-9:
                new.append(part)
                continue
            # the scaled data as a new version of the view's arrays, in row blocks
            vp = io.vis(dict(part, name=view_name(part, "fluxeq")))
            for blk in vp.blocks():
                vp.write("DATA", blk.rows, (blk.data * factor).astype(np.complex64), before=blk.data)
                # weights of data scaled by f scale by 1 / f^2, as a flux error's would
                vp.write("WEIGHT", blk.rows, (blk.weight / factor ** 2).astype(np.float32), before=blk.weight)
                io.count_visibilities(blk.data.size)
            new.append(dict(vp.commit(), flux_factor=factor))
        ctx["target_partitions"] = new
        csv = "eb,ratio,ratio_err,factor\n" + "".join(
            f"{eb},{s['ratio']:.6f},{s['ratio_err']:.6f},{s['factor']:.6f}\n" for eb, s in res["ebs"].items())
        res["factors_key"] = io.put_bytes(csv.encode(), "flux_equalization.csv", "text/csv")["key"]
        qa.note("Each EB's target data scaled to the MOUS's mean flux scale: "
                + ", ".join(f"{eb} x{s['factor']:.4f}" for eb, s in res["ebs"].items()) + ".")
    ctx["flux_consistency"] = res
    return qa
