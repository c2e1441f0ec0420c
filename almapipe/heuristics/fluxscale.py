"""The EBs of an MOUS against each other: their phase calibrators' fluxes compared
(hifa_fluxcalflag's consistency check across EBs, which ALMA's Cycle 4 pipeline lists as
missing)."""
from __future__ import annotations

import numpy as np


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
