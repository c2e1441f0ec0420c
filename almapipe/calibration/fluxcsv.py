"""flux.csv: the calibrator fluxes the ALMA pipeline reads (and writes) beside an EB.

ALMA's columns, one row per MS, field and spw: ``ms,field,spw,I,Q,U,V,spix,uvmin,uvmax,comment``
(older files lack uvmin and uvmax). I is Stokes I in Jy at the spw's centre frequency,
spix the spectral index there; the fluxes come from the calibrator catalogue (for the
flux calibrator) or from fluxscale. The form almapipe wrote before,
``field,freq_hz,flux_jy,spix,comment``, is still read.
"""
from __future__ import annotations

import csv
import io

import numpy as np

ALMA_COLUMNS = ["ms", "field", "spw", "I", "Q", "U", "V", "spix", "uvmin", "uvmax", "comment"]


class FluxCsvError(ValueError):
    """A flux.csv row cannot be read; the message names the row and the problem."""


def _ms_matches(name: str, ms_name: str | None) -> bool:
    if not ms_name:
        return True
    base = name.strip().rstrip("/")
    base = base[:-3] if base.endswith(".ms") else base
    return base.split("/")[-1] == ms_name


def parse(text: str, spw_freqs: dict, ms_name: str | None = None) -> dict:
    """{field name: model} for setjy from a flux.csv. spw_freqs maps spw id -> centre
    frequency (Hz) of this EB's science spws. ALMA rows of other MSs are skipped when
    rows of this one (ms_name, without .ms) exist; a model is {"flux_jy", "ref_freq_hz",
    "spix"} and, from ALMA rows, "spw_fluxes": [[freq_hz, I, spix], ...] per spw."""
    if not text.strip():
        return {}
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return {}
    cols = {c.strip() for c in (rows[0].keys() or []) if c}
    out = {}
    if {"field", "spw", "I"} <= cols:                       # ALMA's columns
        mine = [r for r in rows if _ms_matches(r.get("ms") or "", ms_name)] if "ms" in cols else rows
        rows = mine or rows
        per_field = {}
        for n, r in enumerate(rows, 2):
            try:
                spw, flux = int(r["spw"]), float(r["I"])
                spix = float(r.get("spix") or 0.0)
            except (TypeError, ValueError) as exc:
                raise FluxCsvError(f"flux.csv line {n}: {exc} in {dict(r)}") from None
            if spw not in spw_freqs:
                continue                                     # a spw this EB does not have (or not science)
            per_field.setdefault(r["field"].strip(), []).append([float(spw_freqs[spw]), flux, spix])
        for field, entries in per_field.items():
            entries.sort()
            f = np.array([e[0] for e in entries])
            ref = float(np.exp(np.mean(np.log(f))))
            flux = float(np.exp(np.interp(np.log(ref), np.log(f), np.log([e[1] for e in entries]))))
            out[field] = {"flux_jy": flux, "ref_freq_hz": ref, "spix": float(np.mean([e[2] for e in entries])),
                          "spw_fluxes": entries}
        return out
    if {"field", "flux_jy", "freq_hz"} <= cols:             # almapipe's earlier form
        for n, r in enumerate(rows, 2):
            try:
                out[r["field"].strip()] = {"flux_jy": float(r["flux_jy"]), "spix": float(r.get("spix") or 0.0),
                                           "ref_freq_hz": float(r["freq_hz"])}
            except (TypeError, ValueError) as exc:
                raise FluxCsvError(f"flux.csv line {n}: {exc} in {dict(r)}") from None
        return out
    raise FluxCsvError(f"flux.csv: columns {sorted(cols)} are neither ALMA's ({','.join(ALMA_COLUMNS)}) "
                       f"nor field,freq_hz,flux_jy,spix")


def model_flux(model: dict, freq_hz) -> np.ndarray:
    """A flux.csv model's Stokes I at frequencies: per spw (the entry nearest in
    frequency, with its spectral index) where the file gave spws, else a power law."""
    f = np.asarray(freq_hz, float)
    entries = model.get("spw_fluxes")
    if not entries:
        return model["flux_jy"] * (f / model["ref_freq_hz"]) ** model.get("spix", 0.0)
    ref = np.array([e[0] for e in entries])
    k = np.argmin(np.abs(np.log(f)[..., None] - np.log(ref)), axis=-1)
    e = np.asarray(entries)[k]
    return e[..., 1] * (f / e[..., 0]) ** e[..., 2]


def write(rows: list, ms_name: str) -> str:
    """flux.csv in ALMA's columns from [{field, spw, flux_jy, spix, comment}]."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(ALMA_COLUMNS)
    for r in rows:
        w.writerow([f"{ms_name}.ms", r["field"], r["spw"], f"{r['flux_jy']:.6f}", "0.0", "0.0", "0.0",
                    f"{r.get('spix', 0.0):.4f}", "0.0", "0.0", r.get("comment", "")])
    return out.getvalue()
