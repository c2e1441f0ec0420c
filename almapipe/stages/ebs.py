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

import os

import numpy as np

from .base import QA, Param, StageIO, field_ids_with, field_name, stage
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


def read_member(io: StageIO, part: dict, fields=None, column: str = "DATA") -> tuple[str, msio.Vis]:
    """(MS path, Vis) of one EB's partition, field ids mapped onto the first EB's and scan
    numbers made unique across EBs (EB index x 100000)."""
    ms = io.fetch_dir(part["key"])
    vis = msio.read_vis(ms, part["spw"], column=column, field_ids=eb_field_ids(part, fields))
    if "field_map" in part:
        fmap = {int(k): v for k, v in part["field_map"].items()}
        vis.field_id = np.array([fmap.get(int(f), -1) for f in vis.field_id], int) if len(vis.field_id) else vis.field_id
        vis.scan = vis.scan + 100000 * int(part.get("eb", 0))
    io.visibilities += vis.data.size
    return ms, vis


def read_group(io: StageIO, group, fields=None, column: str = "DATA") -> msio.Vis:
    """One Vis of a spw from every EB's partition of it (group: a partition, or a list of
    the EBs' partitions of one spw)."""
    members = group if isinstance(group, list) else group.get("members", [group])
    vis = [read_member(io, p, fields, column)[1] for p in members]
    try:
        return msio.concat_vis(vis)
    except msio.MSError as exc:
        from .base import StageError
        raise StageError(str(exc)) from exc


def as_group(parts: list) -> dict:
    """A spw's partitions from several EBs as one partition-like entry (its first member's
    keys, and all of them under 'members'); a lone partition stays as it is."""
    return parts[0] if len(parts) == 1 else dict(parts[0], members=parts)


# ------------------------------------------------------------------ fluxconsistency

def flux_consistency(ebs: list, phase_names: set, tolerance: float = 0.03, nsigma: float = 3.0) -> dict:
    """Per EB, its phase calibrators' fluxes (fluxscale) against the MOUS's weighted mean
    per field and spw: the ratios, one scale per EB (the weighted mean of its ratios: a
    flux-scale error is the same in every spw), and which EBs disagree with the EBs'
    median scale by more than nsigma of their errors and more than `tolerance`. ALMA's Cycle 4 pipeline lists the
    absence of this check as a known limitation."""
    rows = [dict(r, eb=e["ms_name"]) for e in ebs for r in e.get("fluxscale", []) if r["field"] in phase_names]
    keys = sorted({(r["field"], r["spw"]) for r in rows}, key=str)
    table, per_eb = [], {e["ms_name"]: [] for e in ebs}
    for field, spw in keys:
        mine = [r for r in rows if r["field"] == field and r["spw"] == spw]
        if len(mine) < 2:
            continue
        f = np.array([r["flux_jy"] for r in mine])
        s = np.array([max(r.get("flux_err_jy") or 0.0, 1e-6 * abs(r["flux_jy"])) for r in mine])
        mean = float(np.sum(f / s ** 2) / np.sum(s ** -2))
        for r, fi, si in zip(mine, f, s):
            ratio = float(fi / mean)
            table.append({"eb": r["eb"], "field": field, "spw": spw, "flux_jy": float(fi), "flux_err_jy": float(si),
                          "mean_jy": mean, "ratio": ratio})
            per_eb[r["eb"]].append((ratio, si / mean))
    scales, outliers = {}, []
    for eb, vals in per_eb.items():
        if not vals:
            continue
        r = np.array([v[0] for v in vals])
        w = np.array([v[1] for v in vals]) ** -2.0
        ratio = float(np.sum(r * w) / np.sum(w))
        err = float(np.sum(w) ** -0.5)
        scales[eb] = {"ratio": ratio, "ratio_err": err, "factor": 1.0 / ratio}
    # an EB disagrees with the others' median: one wrong EB of three pulls the mean a
    # third of its way, the median not at all
    median = float(np.median([s["ratio"] for s in scales.values()])) if scales else 1.0
    for eb, s in scales.items():
        s["ratio_to_median"] = s["ratio"] / median
        off = abs(s["ratio_to_median"] - 1)
        if off > tolerance and off > nsigma * s["ratio_err"]:
            outliers.append(eb)
    return {"table": table, "ebs": scales, "outliers": outliers, "tolerance": tolerance, "nsigma": nsigma}


@stage("fluxconsistency", service="calibrator", topic="Calibration",
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
        qa.lower(0.8, "No phase calibrator flux measured in two or more EBs: flux scales not compared.")
        ctx["flux_consistency"] = res
        return qa
    for eb, s in res["ebs"].items():
        io.log("EB %s: flux scale %.4f +- %.4f of the MOUS mean", eb, s["ratio"], s["ratio_err"])
        qa.note(f"EB {eb}: phase calibrator fluxes at {s['ratio']:.3f} ± {s['ratio_err']:.3f} of the weighted mean.")
    for eb in res["outliers"]:
        s = res["ebs"][eb]
        qa.lower(0.6, f"EB {eb}: flux scale {s['ratio_to_median'] - 1:+.1%} from the EBs' median (beyond "
                      f"{res['nsigma']:g} sigma and {res['tolerance']:.0%}); check its flux calibrator's model.")
    if params["equalize"]:
        res["equalized"] = True
        new = []
        for part in ctx["target_partitions"]:
            factor = res["ebs"].get(part.get("ms_name"), {}).get("factor", 1.0)
            if abs(factor - 1) < 1e-9:
                new.append(part)
                continue
            ms = io.fetch_dir(part["key"])
            vis = msio.read_vis(ms, part["spw"])
            msio.write_column(ms, vis.rows, "DATA", (vis.data * factor).astype(np.complex64))
            # weights of data scaled by f scale by 1 / f^2, as a flux error's would
            msio.write_column(ms, vis.rows, "WEIGHT", (vis.weight / factor ** 2).astype(np.float32))
            name = part["name"].replace(".ms", ".fluxeq.ms")
            dest = os.path.join(io.workdir, f"eb{part.get('eb', 0)}_{name}")
            os.rename(ms, dest)
            entry = io.put_dir(dest, os.path.basename(dest))
            new.append(dict(part, key=entry["key"], sha256=entry["sha256"], name=os.path.basename(dest),
                            flux_factor=factor))
        ctx["target_partitions"] = new
        csv = "eb,ratio,ratio_err,factor\n" + "".join(
            f"{eb},{s['ratio']:.6f},{s['ratio_err']:.6f},{s['factor']:.6f}\n" for eb, s in res["ebs"].items())
        res["factors_key"] = io.put_bytes(csv.encode(), "flux_equalization.csv", "text/csv")["key"]
        qa.note("Each EB's target data scaled to the MOUS's mean flux scale: "
                + ", ".join(f"{eb} x{s['factor']:.4f}" for eb, s in res["ebs"].items()) + ".")
    ctx["flux_consistency"] = res
    return qa
