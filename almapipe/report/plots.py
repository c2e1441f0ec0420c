"""Shared pieces of the WebLog's plots, used by the stages that save them.

Per-antenna small multiples (one panel per antenna, named, so a bad antenna can be
named from the picture), robust outlier naming, and the rule that a plot without
finite data is an error and not an empty picture (the applycal plots were empty on
ALMA data while the stage scored 1.00).
"""
from __future__ import annotations

import math

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ..heuristics.robust import mad_std  # noqa: E402


class EmptyPlotError(RuntimeError):
    """A plot would show no finite data: the data it shows are all flagged or NaN."""


def require_finite(what: str, *arrays) -> None:
    """Raise EmptyPlotError naming the plot when none of the arrays holds a finite value."""
    if not any(np.isfinite(np.asarray(a, dtype=float)).any() for a in arrays if np.size(a)):
        raise EmptyPlotError(f"{what}: no unflagged, finite data to plot")


def antenna_grid(n: int, title: str, panel_in: float = 1.9):
    """A figure of n small panels (about square grid, shared axes) and the flat list of
    the panels; the panels beyond n are hidden."""
    ncol = max(1, math.ceil(math.sqrt(n * 1.3)))
    nrow = max(1, math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(panel_in * ncol, 0.8 * panel_in * nrow + 0.4),
                             sharex=True, sharey=True, squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes:
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return fig, axes[:n]


def label_panel(ax, name: str, state: str = "") -> None:
    """Name a panel's antenna; state 'outlier' frames it red, 'flagged' says so across it."""
    colour = {"outlier": "tab:red", "flagged": "0.5"}.get(state, "black")
    ax.set_title(name + (f" ({state})" if state else ""), fontsize=7, color=colour, pad=2)
    if state == "outlier":
        for sp in ax.spines.values():
            sp.set_color("tab:red")
            sp.set_linewidth(2)
    if state == "flagged":
        ax.text(0.5, 0.5, "all flagged", transform=ax.transAxes, ha="center", va="center", fontsize=7,
                color="0.5")


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
