"""Recipes are data: an ordered list of stages with parameters (JSON files here).

Parameter overrides address a stage by name ("uvcontsub.fitspw") or by its
index ("10.fitspw"); values are JSON ("0.5", "\"4~6\"", "{\"a\": 1}").
"""
from __future__ import annotations

import copy
import json
import os
import re

from ..errors import ParameterError
from ..stages import REGISTRY

DIR = os.path.dirname(__file__)
DEFAULT = "vla_calimage"


class RecipeError(ParameterError):
    """The recipe or a parameter override is invalid."""


# A run without a recipe imports its data first and then takes the recipe for the
# telescope that observed it (for_telescope): ALMA's EBs the ALMA procedure.
AUTO = "auto"
BY_TELESCOPE = {"ALMA": "alma_calimage", "ACA": "alma_calimage", "OSF": "alma_calimage"}


def for_telescope(telescope: str) -> str:
    """The recipe for data of a telescope (OBSERVATION.TELESCOPE_NAME)."""
    return BY_TELESCOPE.get(str(telescope).strip().upper(), DEFAULT)


def auto() -> dict:
    """The provisional recipe of a run whose recipe is chosen from its data: importdata,
    and the WebLog that reports a failure to import; once the data are imported, the
    coordinator puts the chosen recipe's other stages after importdata."""
    return validate({"name": AUTO, "version": 1, "stages": [{"stage": "importdata", "params": {}},
                                                            {"stage": "weblog", "params": {}}],
                     "description": "importdata, then the recipe for the data's telescope"})


def check_overrides_somewhere(overrides: dict, candidates: list) -> None:
    """Overrides of a run whose recipe is not chosen yet: each must be valid in at least
    one candidate recipe (so a misspelt stage is refused at submit)."""
    for key, value in overrides.items():
        errors = []
        for name in candidates:
            try:
                apply_overrides(load(name), {key: value})
                break
            except RecipeError as exc:
                errors.append(str(exc))
        else:
            raise RecipeError(errors[0])


def available() -> list:
    return sorted(f[:-5] for f in os.listdir(DIR) if f.endswith(".json"))


def load(name: str | None) -> dict:
    name = name or DEFAULT
    # a name, never a path: only the recipe files here
    if not re.fullmatch(r"[a-z0-9_]+", name) or name not in available():
        raise RecipeError(f"unknown recipe {name[:64]!r}; available: {', '.join(available())}")
    path = os.path.join(DIR, f"{name}.json")
    if not os.path.exists(path):
        raise RecipeError(f"unknown recipe {name!r}; available: {', '.join(available())}")
    with open(path) as f:
        doc = json.load(f)
    if "extends" in doc:   # a recipe that is another recipe with some parameters changed
        base = load(doc["extends"])
        base = apply_overrides(base, doc.get("overrides", {}))
        base.update({k: v for k, v in doc.items() if k not in ("extends", "overrides", "stages")})
        return base
    return validate(doc)


def validate(recipe: dict) -> dict:
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), list) or not recipe["stages"]:
        raise RecipeError("a recipe is an object with a non-empty 'stages' list")
    for i, st in enumerate(recipe["stages"]):
        if not isinstance(st, dict) or st.get("stage") not in REGISTRY:
            raise RecipeError(f"recipe stage {i}: unknown stage {st.get('stage') if isinstance(st, dict) else st!r}; "
                              f"known: {', '.join(sorted(REGISTRY))}")
        if not isinstance(st.get("params", {}), dict):
            raise RecipeError(f"recipe stage {i} ({st['stage']}): params must be an object")
        st.setdefault("params", {})
        check_params(st)
        st["service"] = REGISTRY[st["stage"]].service
    recipe.setdefault("name", "custom")
    recipe.setdefault("version", 1)
    return recipe


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    out = copy.deepcopy(recipe)
    for key, raw in overrides.items():
        target, _, param = key.partition(".")
        if not param:
            raise RecipeError(f"parameter override {key!r}: expected '<stage>.<param>'")
        stages = out["stages"]
        if target.isdigit():
            idx = [int(target)] if int(target) < len(stages) else []
        else:
            idx = [i for i, s in enumerate(stages) if s["stage"] == target][:1]
        if not idx:
            raise RecipeError(f"parameter override {key!r}: no stage {target!r} in recipe {out['name']}")
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw   # a bare string
        else:
            value = raw
        stages[idx[0]]["params"][param] = value
        check_params(stages[idx[0]])
    return out


def check_params(st: dict) -> None:
    """A recipe stage's parameters against its declaration (stages.base.Param): an
    unknown name, a wrong type or a value out of range is a RecipeError naming the
    stage, the parameter and what is allowed, so a run is refused at submit rather
    than failing minutes later."""
    try:
        REGISTRY[st["stage"]].check(st["params"])
    except ParameterError as exc:
        raise RecipeError(str(exc)) from None


def describe(stage_name: str) -> str:
    """A stage's parameters as `almapipe recipes --describe STAGE` prints them."""
    if stage_name not in REGISTRY:
        raise RecipeError(f"unknown stage {stage_name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[stage_name]
    doc = (spec.fn.__doc__ or "").strip().split("\n\n")[0]
    lines = [f"{spec.name} ({spec.service}; WebLog topic {spec.topic})", "    " + " ".join(doc.split())]
    lines.append(f"  reads:  {', '.join(spec.reads) or '-'}")
    lines.append(f"  writes: {', '.join(spec.writes) or '-'}")
    public = [p for p in spec.params if not p.internal]
    lines.append("  parameters:" if public else "  parameters: none")

    def add(params, indent):
        for p in params:
            if p.internal:
                continue
            lines.append(f"{indent}{p.name}: {p.describe()}")
            if p.doc:
                lines.append(f"{indent}    {p.doc}")
            add(p.fields, indent + "    ")
    add(public, "    ")
    lines.append("  QA metrics:" if spec.qa else "  QA metrics: none")
    for m in spec.qa:
        lines.append(f"    {m.name}" + (f" ({m.unit})" if m.unit else "") + f": {m.doc}")
    return "\n".join(lines)


# The last stage an MOUS runs per execution block: everything up to it calibrates one EB
# (in a run of its own); the stages after it image and report the MOUS as a whole.
LAST_PER_EB_STAGE = "split"


def split_for_mous(recipe: dict) -> tuple[dict, dict]:
    """(the per-EB recipe, the MOUS recipe) of a recipe for several EBs."""
    names = [s["stage"] for s in recipe["stages"]]
    if LAST_PER_EB_STAGE not in names or names.index(LAST_PER_EB_STAGE) == len(names) - 1:
        raise RecipeError(f"recipe {recipe['name']} cannot process several EBs: it needs a "
                          f"{LAST_PER_EB_STAGE!r} stage followed by the stages that combine them")
    cut = names.index(LAST_PER_EB_STAGE) + 1
    per_eb = dict(copy.deepcopy(recipe), stages=copy.deepcopy(recipe["stages"][:cut]))
    per_eb["name"] = recipe["name"] + ":eb"
    mous = dict(copy.deepcopy(recipe), stages=copy.deepcopy(recipe["stages"][cut:]))
    return per_eb, mous
