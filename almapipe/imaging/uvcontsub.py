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

    The fit uses unflagged continuum channels only; rows with too few such
    channels are left unchanged and reported through the returned model (zero).
    """
    nrow, nchan, ncorr = data.shape
    x = np.linspace(-1, 1, nchan)
    basis = np.stack([x ** k for k in range(order + 1)], axis=1)          # (nchan, order+1)
    w = (~flag & cont_mask[None, :, None]).astype(np.float64)             # (nrow, nchan, ncorr)
    # normal equations per (row, corr): (B^T W B) c = B^T W d
    bwb = np.einsum("rcp,ck,cl->rpkl", w, basis, basis)
    bwd = np.einsum("rcp,ck,rcp->rpk", w, basis, data)
    enough = (w.sum(axis=1) > order)
    eye = np.eye(order + 1)
    coef = np.linalg.solve(np.where(enough[..., None, None], bwb, eye), bwd[..., None])[..., 0]
    coef = np.where(enough[..., None], coef, 0)
    model = np.einsum("ck,rpk->rcp", basis, coef)
    return (data - model).astype(data.dtype), model
