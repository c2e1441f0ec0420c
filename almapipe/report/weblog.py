"""WebLog rendering: static HTML pages from the pipeline context.

Home (observation overview, pipeline summary, observation summary), By Task
(the stage list with QA scores coloured as the ALMA WebLog does), By Topic,
and one page per stage with its parameters, QA reasons, result tables,
plots and log.
"""
from __future__ import annotations

import os

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..stages.base import REGISTRY, TOPICS, qa_colour


def by_topic(stages: list) -> list:
    """The By Topic page's sections: (topic, its stages), in TOPICS order. Each stage
    declares its topic where it is registered (stages.base.stage), so a new stage is
    never missing here."""
    def topic(s):
        spec = REGISTRY.get(s["name"])
        return spec.topic if spec else ""
    return [(t, [s for s in stages if topic(s) == t]) for t in TOPICS]


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                      autoescape=select_autoescape(["html"]))
    env.globals["colour"] = qa_colour
    return env


def _result_tables(ctx: dict, name: str) -> list:
    if name == "fluxscale" and ctx.get("fluxscale"):
        return [{"title": "Derived flux densities", "header": ["Field", "spw", "Flux (Jy)", "Error (Jy)", "N"],
                 "rows": [[r["field"], r["spw"], f"{r['flux_jy']:.4f}", f"{r['flux_err_jy']:.4f}", r["n"]]
                          for r in ctx["fluxscale"]]}]
    if name == "fluxconsistency" and (ctx.get("flux_consistency") or {}).get("ebs"):
        fc = ctx["flux_consistency"]
        return [{"title": "Flux scale of each EB (phase calibrators against the MOUS's weighted mean)",
                 "header": ["EB", "Ratio", "Error", "Factor applied", "Disagrees"],
                 "rows": [[eb, f"{s['ratio']:.4f}", f"{s['ratio_err']:.4f}",
                           f"{s['factor']:.4f}" if fc.get("equalized") else "-", "yes" if eb in fc["outliers"] else ""]
                          for eb, s in fc["ebs"].items()]},
                {"title": "Per field and spw", "header": ["EB", "Field", "spw", "Flux (Jy)", "Error (Jy)",
                                                          "Mean (Jy)", "Ratio"],
                 "rows": [[r["eb"], r["field"], r["spw"], f"{r['flux_jy']:.4f}", f"{r['flux_err_jy']:.4f}",
                           f"{r['mean_jy']:.4f}", f"{r['ratio']:.4f}"] for r in fc["table"]]}]
    if name == "setjy" and ctx.get("setjy"):
        return [{"title": "Flux density models", "header": ["Field", "spw", "Frequency (GHz)", "Flux (Jy)", "Model"],
                 "rows": [[r["field"], r["spw"], f"{r['freq_hz'] / 1e9:.6f}", f"{r['flux_jy']:.4f}", r["model"]]
                          for r in ctx["setjy"]]}]
    if name == "refant" and ctx.get("refant"):
        return [{"title": "Reference antenna ranking", "header": ["Rank", "Antenna", "Geometry", "Flagging"],
                 "rows": [[i + 1, a, f"{ctx['refant']['scores'][a]['geometry']:.2f}",
                           f"{ctx['refant']['scores'][a]['flagging']:.2f}"]
                          for i, a in enumerate(ctx["refant"]["ranked"][:10])]}]
    if name == "flagdata" and ctx["flags"].get("flagdata"):
        fr = ctx["flags"]["flagdata"]["fractions"]
        return [{"title": "Flagged fraction", "header": ["Reason", "Fraction"],
                 "rows": [[k, f"{v:.4f}"] for k, v in fr.items()]}]
    if name == "uvcontsub" and ctx.get("continuum"):
        return [{"title": "Continuum ranges (cont.dat)", "header": ["Field", "spw", "Channels", "Ranges (GHz)",
                                                                   "Frame", "From"],
                 "rows": [[e["field"], e["spw"], e["channels"],
                           "; ".join(f"{a:.6f}~{b:.6f}" for a, b in e["ranges_ghz"]), e.get("frame", ""), e["origin"]]
                          for e in ctx["continuum"]]}]
    if name == "spwphaseup" and ctx.get("spwphaseup"):
        up = ctx["spwphaseup"]
        return [{"title": f"Phase SNR per {up['solint']} on the phase calibrator (threshold {up['phasesnr']:g})",
                 "header": ["spw", "SNR", "Phases from spw"],
                 "rows": [[s, f"{v:.1f}", up["spwmap"][s]] for s, v in up["snr"].items()]}]
    if name == "makeimages" and ctx.get("images"):
        return [{"title": "Images", "header": ["File", "Mode", "Beam (\")", "Peak (mJy/beam)", "rms (mJy/beam)",
                                               "Theoretical rms", "Dirty DR", "DR correction", "QA"],
                 "rows": [[i["file"], i["specmode"] + (" (aggregate)" if i.get("aggregate") else "")
                           + (f", mosaic of {i['pointings']} pointings" if i.get("pointings", 1) > 1 else ""),
                           "{:.1f} x {:.1f} @ {:.0f}".format(*i["beam_arcsec"]),
                           f"{i['peak_jy_per_beam'] * 1e3:.2f}", f"{i['rms_jy_per_beam'] * 1e3:.3f}",
                           f"{i['theoretical_rms_jy_per_beam'] * 1e3:.3f}" if i.get("theoretical_rms_jy_per_beam") else "",
                           f"{i['dirty_dynamic_range']:.0f}" if i.get("dirty_dynamic_range") else "",
                           f"{i.get('dr_correction', 1.0):.2f}", f"{i['qa_score']:.2f}"] for i in ctx["images"]]}]
    return []


def _eb_rows(ctx: dict) -> list:
    """An MOUS's execution blocks for Home: each one's run, time, reference antenna, its
    lowest stage score and its flux scale against the others'."""
    scales = (ctx.get("flux_consistency") or {}).get("ebs", {})
    outliers = (ctx.get("flux_consistency") or {}).get("outliers", [])
    rows = []
    for e in ctx.get("ebs", []):
        scored = [s for s in e.get("stages", []) if s["qa_score"] >= 0]
        worst = min(scored, key=lambda s: s["qa_score"]) if scored else None
        sc = scales.get(e["ms_name"])
        rows.append({"name": e["ms_name"], "run_id": e["run_id"], "start": e.get("start"), "end": e.get("end"),
                     "refant": e.get("refant"), "min_qa": worst["qa_score"] if worst else -1,
                     "min_qa_stage": worst["name"] if worst else "",
                     "flux_ratio": f"{sc['ratio']:.3f} ± {sc['ratio_err']:.3f}" if sc else "",
                     "outlier": e["ms_name"] in outliers})
    return rows


def render(ctx: dict, out_dir: str, plot_files: dict) -> list:
    """Write the WebLog into out_dir; plot_files maps stage index -> [png file names
    already in out_dir]. Returns the list of files written."""
    env = _env()
    obs = ctx.get("observation", {})
    stages = []
    for r in ctx["stage_results"]:
        stages.append({"index": r["index"], "name": r["name"], "service": r["service"],
                       "qa_score": r["qa_score"], "reasons": r["qa_reasons"], "duration_s": r["duration_s"],
                       "params": r.get("params", {}), "plots": plot_files.get(r["index"], []),
                       "log": r.get("log", []), "tables": _result_tables(ctx, r["name"]),
                       "failed": r.get("failed", False)})
    scored = [s for s in stages if s["qa_score"] >= 0]
    worst = min(scored, key=lambda s: s["qa_score"]) if scored else None
    fields = []
    for f in ctx.get("fields", []):
        of = next((o for o in obs.get("fields", []) if o["id"] == f["id"]), {})
        fields.append({"id": f["id"], "name": f["name"], "intents": f["intents"],
                       "ra_deg": np.degrees(of.get("ra_rad", 0.0)), "dec_deg": np.degrees(of.get("dec_rad", 0.0)),
                       "t_on": of.get("time_on_source_s", 0.0)})
    common = {"run_id": ctx["run_id"], "stages": stages}
    pages = {
        "index.html": env.get_template("index.html").render(
            title="Home", obs=obs, ms_name=ctx.get("ms_name", ""), recipe=ctx["recipe"],
            input_key=ctx["input_key"], input_format=ctx.get("input_format", ""),
            nant=sum(a.get("has_data", False) for a in obs.get("antennas", [])),
            min_qa=worst["qa_score"] if worst else -1, min_qa_stage=worst["name"] if worst else "",
            failed=[s["name"] for s in stages if s.get("failed")], fluxscale=ctx.get("fluxscale", []),
            fields=fields, roles_from=(ctx.get("fields") or [{}])[0].get("roles_from", ""),
            field_intents={f["id"]: f["intents"] for f in ctx.get("fields", [])}, failure=ctx.get("failure"),
            ebs=_eb_rows(ctx), mous_id=ctx.get("mous_id") or ctx.get("user", {}).get("mous_id", ""),
            **common),
        "by_task.html": env.get_template("by_task.html").render(title="By Task", **common),
        "by_topic.html": env.get_template("by_topic.html").render(
            title="By Topic", topics=by_topic(stages), **common),
    }
    for s in stages:
        pages[f"stage{s['index']}.html"] = env.get_template("stage.html").render(title=s["name"], s=s, **common)
    for name, html in pages.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(html)
    return list(pages)
