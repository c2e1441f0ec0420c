"""The QA2 section of the products README: achieved noise and resolution of the
target images against what the observation asked for, and a QA2 state proposed
to the reviewer (who decides; the pipeline only proposes).

ALMA's QA2 criteria (ALMA Technical Handbook / QA2 reports): the data Pass when the
image noise reaches the requested sensitivity, within ~10 %, and the angular
resolution is the requested one (or inside the requested range); SemiPass when they
miss that but remain scientifically useful; Fail otherwise. The numbers below are our
reading of those rules; the reviewer sees every ratio they come from.
"""
from __future__ import annotations

import math

# rms / requested rms: Pass up to 1.1 (ALMA's "within 10 % of the goal"), SemiPass up to 2
RMS_PASS, RMS_SEMIPASS = 1.10, 2.0
# beam (geometric mean) / requested resolution when one value is requested: Pass within
# 20 % either way, SemiPass within 50 % (a range given as [min, max] is used as is)
BEAM_PASS, BEAM_SEMIPASS = 0.20, 0.50
STATES = ("Pass", "SemiPass", "Fail")


def requested_goals(ctx: dict, params: dict) -> dict:
    """The requested sensitivity (Jy/beam) and resolution (arcsec, a value or [min, max])
    of the run: exportdata's parameters, else what the run's trigger carried (the user
    inputs), else nothing."""
    sources = [params, ctx.get("user") or {}]
    out = {}
    for key in ("requested_rms_jy", "requested_beam_arcsec", "requested_specmode"):
        for src in sources:
            if src.get(key) not in (None, ""):
                out[key] = src[key]
                break
    if isinstance(out.get("requested_rms_jy"), str):
        out["requested_rms_jy"] = float(out["requested_rms_jy"])
    beam = out.get("requested_beam_arcsec")
    if isinstance(beam, str):
        beam = [float(x) for x in beam.replace("[", "").replace("]", "").split(",") if x.strip()]
    if isinstance(beam, (list, tuple)) and len(beam) == 1:
        beam = beam[0]
    if beam is not None:
        out["requested_beam_arcsec"] = beam
    return out


def _beam_state(achieved_arcsec: float, requested) -> tuple[str, str]:
    if isinstance(requested, (list, tuple)):
        lo, hi = (float(x) for x in requested)
        if lo <= achieved_arcsec <= hi:
            return "Pass", f"beam {achieved_arcsec:.3g}\" in the requested {lo:.3g}-{hi:.3g}\""
        off = max(lo / achieved_arcsec, achieved_arcsec / hi) - 1
        state = "SemiPass" if off <= BEAM_SEMIPASS else "Fail"
        return state, f"beam {achieved_arcsec:.3g}\" outside the requested {lo:.3g}-{hi:.3g}\""
    ratio = achieved_arcsec / float(requested)
    off = abs(ratio - 1)
    state = "Pass" if off <= BEAM_PASS else "SemiPass" if off <= BEAM_SEMIPASS else "Fail"
    return state, f"beam {achieved_arcsec:.3g}\" = {ratio:.2f} x the requested {float(requested):.3g}\""


def qa2_verdict(rms_jy: float | None, beam_arcsec, requested_rms_jy: float | None = None,
                requested_beam=None) -> tuple[str, list]:
    """(Pass | SemiPass | Fail, reasons) of one image: the worse of its noise's and its
    resolution's states, each judged only where a goal was requested. beam_arcsec is
    (bmaj, bmin[, bpa]) or one size; the resolution compared is sqrt(bmaj bmin)."""
    states, reasons = [], []
    if requested_rms_jy:
        if not rms_jy or rms_jy <= 0:
            states.append("Fail")
            reasons.append("no rms measured")
        else:
            ratio = rms_jy / float(requested_rms_jy)
            states.append("Pass" if ratio <= RMS_PASS else "SemiPass" if ratio <= RMS_SEMIPASS else "Fail")
            reasons.append(f"rms {rms_jy * 1e3:.3g} mJy/beam = {ratio:.2f} x the requested "
                           f"{float(requested_rms_jy) * 1e3:.3g}")
    if requested_beam is not None:
        if isinstance(beam_arcsec, (int, float)):
            size = float(beam_arcsec)
        else:
            size = math.sqrt(float(beam_arcsec[0]) * float(beam_arcsec[1])) if beam_arcsec else 0.0
        if size <= 0:
            states.append("Fail")
            reasons.append("no beam")
        else:
            st, why = _beam_state(size, requested_beam)
            states.append(st)
            reasons.append(why)
    if not states:
        return "", ["no goal requested"]
    return max(states, key=STATES.index), reasons


def qa2_section(images: list, goals: dict) -> str:
    """The README's QA2 table: per target image (field, spw, mode) the achieved beam and
    rms against the goals, its state, and the state proposed for the data: the worst
    of the images of the requested kind (requested_specmode 'cube' or 'cont'; by default
    the cubes where there are any, else the continuum images)."""
    rms_goal, beam_goal = goals.get("requested_rms_jy"), goals.get("requested_beam_arcsec")
    targets = [i for i in images if "TARGET" in (i.get("intents") or [])]
    lines = ["QA2 (proposed for the reviewer)", "-------------------------------"]
    goal_text = []
    if rms_goal:
        goal_text.append(f"sensitivity {float(rms_goal) * 1e3:.3g} mJy/beam")
    if beam_goal is not None:
        goal_text.append("resolution " + (f"{beam_goal[0]:.3g}-{beam_goal[1]:.3g}\""
                                          if isinstance(beam_goal, (list, tuple)) else f"{float(beam_goal):.3g}\""))
    lines.append("requested   : " + (", ".join(goal_text) if goal_text else
                                     "none given (parameters exportdata.requested_rms_jy, "
                                     "exportdata.requested_beam_arcsec)"))
    if not targets:
        lines += ["no target images", ""]
        return "\n".join(lines)
    lines.append("")
    names = [img["file"].replace(".pbcor.fits", "") for img in targets]
    width = max(len(n) for n in names + ["image"])
    lines.append(f"{'image':{width}s}  {'beam (arcsec, deg)':22s}  {'rms mJy/beam':>12s}  state")
    per_kind = {}
    for img, name in zip(targets, names):
        state, reasons = qa2_verdict(img.get("rms_jy_per_beam"), img.get("beam_arcsec"), rms_goal, beam_goal)
        kind = "cube" if img.get("specmode") == "cube" else "cont"
        per_kind.setdefault(kind, []).append(state)
        b = img.get("beam_arcsec") or [0, 0, 0]
        rms = img.get("rms_jy_per_beam") or 0.0
        beam = f"{b[0]:.3g} x {b[1]:.3g}, {b[2]:.1f}"
        lines.append(f"{name:{width}s}  {beam:22s}  {rms * 1e3:12.3g}  {state or '-'}"
                     + (f"  ({'; '.join(reasons)})" if state else ""))
    kind = goals.get("requested_specmode") or ("cube" if "cube" in per_kind else "cont")
    states = [s for s in per_kind.get(kind, []) if s]
    proposal = max(states, key=STATES.index) if states else "none (no goal to compare with)"
    lines += ["", f"proposed QA2 state: {proposal}" + (f" (from the {kind} images)" if states else ""), ""]
    return "\n".join(lines)
