"""Continuum subtraction in the visibility domain, and channel-range parsing.

For every row (baseline and time) and correlation, a polynomial of order 0
or 1 in frequency is fitted to the real and imaginary parts of the
continuum channels and subtracted from all channels (CASA's uvcontsub).
"""
from __future__ import annotations

import numpy as np

from ..errors import ParameterError


def parse_channels(spec: str, nchan: int) -> np.ndarray:
    """'4~6;50~59' (CASA's syntax, with or without 'spw:' prefix) -> boolean mask."""
    if ":" in spec:
        spec = spec.split(":", 1)[1]
    mask = np.zeros(nchan, bool)
    for part in spec.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("~")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ParameterError(f"channel range {part!r}: expected 'N' or 'N~M'") from None
        if not (0 <= lo_i <= hi_i < nchan):
            raise ParameterError(f"channel range {part!r} outside 0~{nchan - 1}")
        mask[lo_i:hi_i + 1] = True
    return mask


def format_channels(mask: np.ndarray) -> str:
    """Boolean channel mask -> '4~6;50~59'."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return ""
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    return ";".join(f"{r[0]}~{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def subtract_continuum(data: np.ndarray, flag: np.ndarray, cont_mask: np.ndarray, order: int = 0):
    """Return (line data, continuum model) for data (nrow, nchan, ncorr).

    The fit uses unflagged continuum channels only, each with the same weight; rows with
    no more such channels than the order are left unchanged (their model is zero). The
    stage subtracts in place over row blocks (kernels.subtract_continuum_rows)."""
    from .kernels import subtract_continuum_rows
    nrow, nchan, ncorr = data.shape
    line = np.ascontiguousarray(data, dtype=np.complex64).copy()
    subtract_continuum_rows(line, np.ascontiguousarray(flag), np.ones((nrow, ncorr), np.float32),
                            np.ones(nrow, bool), np.ascontiguousarray(cont_mask, dtype=bool), int(order),
                            np.zeros(nchan, np.complex128), np.zeros(nchan))
    return line.astype(data.dtype, copy=False), data - line
