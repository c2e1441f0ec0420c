"""WebLog rendering: static HTML pages from the pipeline context.

Home opens with the triage: what needs a human (the lowest per-reason scores, each
linked to its evidence on the stage's page, the antennas/spws/EBs named as outliers,
failed and skipped stages), everything green in one line; then the observation
overview, pipeline summary and observation summary. By Task (the stage list with QA
scores coloured as the ALMA WebLog does), By Topic, and one page per stage with its
per-metric QA, parameters, the command that reruns it, result tables, plots and log.
"""
from __future__ import annotations

import json
import os
import shlex

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..stages.base import REGISTRY, TOPICS, qa_colour, specs_in_run_order

GOOD = 0.9          # below this a score needs a human (the ALMA WebLog's green)

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
    """The Results section of a stage's page: the tables its registration declares
    (stage(tables=...), next to the stage in its own module)."""
    spec = REGISTRY.get(name)
    return spec.tables(ctx) if spec and spec.tables else []


def _metric_rows(name: str, entries: list) -> list:
    """The QA table of a stage's page: each metric the stage declares (stage(qa=...)),
    with what it measures, its score (1.0, passed, when it lowered nothing) and its
    reasons; then the entries of metrics it does not declare (an older context's),
    grouped by metric. Lowest score first, declaration order among equals."""
    spec = REGISTRY.get(name)
    rows, seen = [], set()
    for m in (spec.qa if spec else ()):
        mine = sorted((e for e in entries if e["metric"] == m.name), key=lambda e: e["score"])
        rows.append({"metric": m.name, "doc": m.doc, "unit": m.unit, "entries": mine, "passed": not mine,
                     "score": mine[0]["score"] if mine else 1.0})
        seen.add(m.name)
    for e in entries:
        if e["metric"] not in seen:
            mine = sorted((x for x in entries if x["metric"] == e["metric"]), key=lambda x: x["score"])
            rows.append({"metric": e["metric"], "doc": "", "unit": "", "entries": mine, "passed": False,
                         "score": mine[0]["score"]})
            seen.add(e["metric"])
    return sorted(rows, key=lambda r: r["score"])


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




def _anchor(text: str) -> str:
    """An HTML id from a plot or table name (the evidence a QA entry points at)."""
    return "ev-" + "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _outliers(ctx: dict, pages: dict) -> list:
    """The antennas, spws and EBs some stage named as outliers, each with the page
    that shows why: [{what, why, href, also, also_label?}]. pages: stage name -> its
    page. Each stage declares what it names (stage(outliers=...), beside the stage);
    they come in the run's order (stages.base.specs_in_run_order)."""
    def link(stage: str, evidence: str = "", anchor: str = "") -> str:
        anchor = _anchor(evidence) if evidence else anchor
        return pages.get(stage, "") + (f"#{anchor}" if anchor and stage in pages else "")

    return [o for spec in specs_in_run_order(ctx) if spec.outliers for o in spec.outliers(ctx, link)]


def triage(ctx: dict, stages: list, current_index: int | None = None) -> dict:
    """What Home opens with: the per-reason scores below GOOD, lowest first, each with
    the link to its evidence; outliers named; failed and skipped stages; the count of
    green stages."""
    low = []
    for s in stages:
        entries = [m for m in s["metrics"] if m["score"] < GOOD]
        if not entries and 0 <= s["qa_score"] < GOOD:     # a score without structured entries
            entries = [{"score": s["qa_score"], "reason": (s["reasons"] or [""])[0], "metric": "", "evidence": ""}]
        for m in entries:
            anchor = _anchor(m["evidence"]) if m.get("evidence") else "qa"
            low.append(dict(m, stage=s["name"], index=s["index"], href=f"stage{s['index']}.html#{anchor}"))
    low.sort(key=lambda m: m["score"])
    done = {s["index"] for s in stages}
    last = current_index if current_index is not None else max(done, default=-1)
    # a recipe's stages are {"stage": name, "params": ...} (recipes/*.json)
    skipped = [(i, st.get("stage") or st.get("name", "?"))
               for i, st in enumerate(ctx.get("recipe", {}).get("stages", []))
               if i < last and i not in done]
    pages = {}
    for s in stages:
        pages.setdefault(s["name"], f"stage{s['index']}.html")
    green = [s for s in stages if s["qa_score"] >= GOOD and not s.get("failed")]
    grouped = {}                  # one line per antenna/spw/EB, with every stage's reason
    for o in _outliers(ctx, pages):
        grouped.setdefault(o["what"], []).append(o)
    return {"low": low, "outliers": grouped, "failed": [s for s in stages if s.get("failed")],
            "skipped": skipped, "green": green, "n_stages": len(stages)}


def shown_params(name: str, params: dict) -> dict:
    """A stage's parameters as its page shows them: without those the pipeline sets
    itself (internal ones, at any depth: stages.base.public_params)."""
    spec = REGISTRY.get(name)
    return spec.public(params) if spec else params


def _param_arg(value) -> str:
    """An override's value as `--param` reads it (recipes.apply_overrides): JSON, or a
    bare string when the string does not read as JSON ("30s", "DA41", "")."""
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        json.loads(value)
    except ValueError:
        return value
    return json.dumps(value)                # "5", "true", "null": quoted, or it would read as a number


def _command(ctx: dict, name: str, params: dict) -> str:
    """The command that reruns the run with this stage's parameters as they were;
    params as shown_params gives them, so the pipeline accepts every --param."""
    args = " ".join("--param " + shlex.quote(f"{name}.{k}={_param_arg(v)}") for k, v in sorted(params.items()))
    recipe = ctx.get("recipe", {}).get("name", "")
    return f"almapipe run INPUT --recipe {recipe} {args}".rstrip()


def render(ctx: dict, out_dir: str, plot_files: dict, current_index: int | None = None,
           image_views: list | None = None) -> list:
    """Write the WebLog into out_dir; plot_files maps stage index -> [png file names
    already in out_dir] (named s<index>_<plot name>); image_views: the per-image detail
    figures (report.images.image_views), shown on the imaging stage's page. Writes each
    stage's log as stage<index>.log. Returns the list of files written."""
    env = _env()
    obs = ctx.get("observation", {})
    stages = []
    for r in ctx["stage_results"]:
        plots = [{"file": p, "id": _anchor(p.split("_", 1)[1] if p.startswith("s") and "_" in p else p)}
                 for p in plot_files.get(r["index"], [])]
        tables = [dict(t, id=_anchor(t.get("evidence", t["title"]))) for t in _result_tables(ctx, r["name"])]
        params = shown_params(r["name"], r.get("params", {}))
        stages.append({"index": r["index"], "name": r["name"], "service": r["service"],
                       "qa_score": r["qa_score"], "reasons": r["qa_reasons"], "metrics": r.get("qa_metrics", []),
                       "duration_s": r["duration_s"], "params": params, "plots": plots,
                       "log": r.get("log", []), "tables": tables, "failed": r.get("failed", False),
                       "log_file": f"stage{r['index']}.log", "command": _command(ctx, r["name"], params),
                       "images": [v for v in image_views or [] if v["stage_index"] == r["index"]]})
    for s in stages:
        # evidence that is not on the page (a plot a stage did not make) points at the QA section
        ids = {p["id"] for p in s["plots"]} | {t["id"] for t in s["tables"]}
        s["metrics"] = [dict(m, evidence=m.get("evidence") if _anchor(m.get("evidence") or "") in ids else "")
                        for m in s["metrics"]]
        for m in s["metrics"]:
            m["href"] = f"#{_anchor(m['evidence'])}" if m["evidence"] else ""
            m["metric"] = m.get("metric") or s["name"]       # an older caller's reason: its stage's
        s["checks"] = _metric_rows(s["name"], s["metrics"])
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
            triage=triage(ctx, stages, current_index), good=GOOD,
            flag_summary_page=next((f"stage{s['index']}.html#{t['id']}" for s in stages for t in s["tables"]
                                    if t["id"] == _anchor("table-flag-fields")), ""), **common),
        "by_task.html": env.get_template("by_task.html").render(title="By Task", **common),
        "by_topic.html": env.get_template("by_topic.html").render(
            title="By Topic", topics=by_topic(stages), **common),
    }
    for s in stages:
        pages[f"stage{s['index']}.html"] = env.get_template("stage.html").render(title=s["name"], s=s, **common)
    for v in image_views or []:
        pages[v["page"]] = env.get_template("image.html").render(title=v["title"], v=v, **common)
    for name, html in pages.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(html)
    for s in stages:     # the stage's log beside its page
        with open(os.path.join(out_dir, s["log_file"]), "w") as f:
            f.write("\n".join(s["log"]) + "\n")
    return list(pages) + [s["log_file"] for s in stages]


def page_weights(out_dir: str) -> dict:
    """The weight of each HTML page with the images it shows, in bytes, and the total
    of the WebLog's files (the budget: 50 MB in all, 5 MB a page)."""
    import re
    sizes = {n: os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir)}
    pages = {}
    for n in sizes:
        if n.endswith(".html"):
            with open(os.path.join(out_dir, n)) as f:
                srcs = set(re.findall(r'<img[^>]*\ssrc="([^"]+)"', f.read()))
            pages[n] = sizes[n] + sum(sizes.get(s, 0) for s in srcs)
    return {"total": sum(sizes.values()), "pages": pages}
