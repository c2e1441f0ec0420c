"""The flagging summary's WebLog tables, shown on the flagdata stage's page (its
stage(tables=...)): presentation of what the flagging stages recorded in the context
(ctx['flags']) and of applycal's flagged fractions (ctx['flag_summary'])."""
from __future__ import annotations

from ..stages.base import specs_in_run_order


def flag_summary_tables(ctx: dict) -> list:
    """The flagging summary applycal recorded (ctx["flag_summary"]): flagged
    fraction per field (with its intents) x spw, and per antenna x spw, then what each
    flagging stage flagged and why."""
    fs = ctx.get("flag_summary") or {}
    tables = []
    if fs:
        spws = sorted(fs, key=int)
        intents = {f["name"]: f["intents"] for f in ctx.get("fields", [])}

        def cells(kind: str, name: str) -> list:
            return [f"{fs[s][kind][name]:.3f}" if name in fs[s][kind] else "" for s in spws]
        names = sorted({n for s in spws for n in fs[s]["fields"]})
        tables.append({"title": "Flagged fraction per field and spw (after applycal)", "evidence": "table-flag-fields",
                       "header": ["Field", "Intents"] + [f"spw {s}" for s in spws],
                       "rows": [[n, ", ".join(intents.get(n, []))] + cells("fields", n) for n in names]})
        ants = [a["name"] for a in ctx.get("observation", {}).get("antennas", [])
                if any(a["name"] in fs[s]["antennas"] for s in spws)]
        tables.append({"title": "Flagged fraction per antenna and spw (after applycal)",
                       "evidence": "table-flag-antennas", "header": ["Antenna"] + [f"spw {s}" for s in spws],
                       "rows": [[a] + cells("antennas", a) for a in ants]})
    rows = [[stage, what] for stage, what in flag_reasons(ctx)]
    if rows:
        tables.append({"title": "What each flagging stage flagged", "header": ["Stage", "Flagged, and why"],
                       "rows": rows})
    return tables


def flag_reasons(ctx: dict) -> list:
    """(stage, what it flagged and why) from each flagging stage's record in ctx['flags'],
    as the stage declares it (stage(flag_reasons=...)), in the run's order (stages.base.specs_in_run_order)."""
    return [(spec.name, text) for spec in specs_in_run_order(ctx) if spec.flag_reasons
            for text in spec.flag_reasons(ctx)]
