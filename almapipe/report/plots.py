"""Shared pieces of the WebLog's plots, used by the stages that save them.

Per-antenna small multiples (one panel per antenna, named, so a bad antenna can be
named from the picture), robust outlier naming, and the rule that a plot without
finite data is an error and not an empty picture (the applycal plots were empty on
ALMA data while the stage scored 1.00).
"""
from __future__ import annotations

import numpy as np
from ..heuristics.robust import mad_std
from .panels import PanelGrid


class EmptyPlotError(RuntimeError):
    """A plot would show no finite data: the data it shows are all flagged or NaN."""


def require_finite(what: str, *arrays) -> None:
    """Raise EmptyPlotError naming the plot when none of the arrays holds a finite value."""
    if not any(np.isfinite(np.asarray(a, dtype=float)).any() for a in arrays if np.size(a)):
        raise EmptyPlotError(f"{what}: no unflagged, finite data to plot")


def antenna_grid(n: int, title: str, panel_in: float = 1.9):
    """A grid of n small panels with shared axes (report/panels.py) and the list of its
    panels; ``StageIO.plot`` takes the grid as it takes a figure."""
    grid = PanelGrid(n, title, panel_in)
    return grid, grid.panels


def label_panel(panel, name: str, state: str = "") -> None:
    """Name a panel's antenna; state 'outlier' frames it red, 'flagged' says so across it."""
    panel.label(name, state)


def robust_outliers(values: dict, nsigma: float = 6.0, floor: float = 0.0) -> dict:
    """{key: value} -> {key: how far above the median, in robust sigmas} for the values
    more than nsigma robust standard deviations (and more than floor) above the median.
    Used on per-antenna deviations from the array, which are >= 0."""
    keys = [k for k, v in values.items() if np.isfinite(v)]
    if len(keys) < 4:            # too few antennas for a statistic
        return {}
    v = np.array([values[k] for k in keys])
    med, sig = float(np.median(v)), float(mad_std(v))
    out = {}
    for k, x in zip(keys, v):
        if x - med > max(nsigma * sig, floor):
            out[k] = (x - med) / sig if sig > 0 else np.inf
    return out
