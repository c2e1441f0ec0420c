"""Small multiples (one panel per antenna) drawn in one matplotlib Axes.

Why: matplotlib makes each Axes with its own ticks, spines and transforms. A grid of
43 antennas as 43 Axes took about 0.25 s to build, 0.1 s to pickle for the drawing
helper (report/render.py) and 1.0-1.2 s to draw, and the calibration stages draw one or
two such grids per spw: on the realistic EB plotting was half of the calibrator's
stage time. A ``PanelGrid`` only records what each panel shows (lines, points,
horizontal lines, shaded ranges, the antenna's name and state). It is a few arrays, so
it pickles in milliseconds, and the helper draws it into a single Axes: each panel is a
box in that Axes, all panels share one x and one y range (as ``sharex``/``sharey``
did), and every line or point of one colour, across all panels, is one artist.

The panel's methods are the few ``Axes`` methods the stages used (``plot``,
``axhline``, ``axvspan``), so a stage draws a panel as it drew an Axes.
"""
from __future__ import annotations

import math

import numpy as np

# a panel's box, in panel units: room for the tick labels on the left and below, and
# for the antenna's name above
LEFT, RIGHT, BOTTOM, TOP = 0.20, 0.03, 0.13, 0.15
STATE_COLOUR = {"outlier": "tab:red", "flagged": "0.5"}


class Panel:
    """What one antenna's panel shows; drawn when its grid becomes a figure."""

    def __init__(self):
        self.lines: list = []      # (x, y, colour, line width)
        self.points: list = []     # (x, y, colour, marker size)
        self.hlines: list = []     # (y, colour, line width)
        self.spans: list = []      # (x0, x1, colour)
        self.name, self.state = "", ""

    def plot(self, x, y, fmt: str = "-", lw: float = 0.8, ms: float = 2.0, color: str = "C0") -> None:
        """A line (fmt '-') or points (fmt '.') of y against x."""
        x = np.asarray(x, dtype=float).ravel()
        y = np.asarray(y, dtype=float).ravel()
        if fmt == ".":
            self.points.append((x, y, color, ms))
        elif fmt == "-":
            self.lines.append((x, y, color, lw))
        else:
            raise ValueError(f"panel plot: format {fmt!r} is not '-' or '.'")

    def axhline(self, y: float, color: str = "0.6", lw: float = 0.5) -> None:
        self.hlines.append((float(y), color, lw))

    def axvspan(self, x0: float, x1: float, color: str = "0.8", lw: float = 0) -> None:
        self.spans.append((float(x0), float(x1), color))

    def label(self, name: str, state: str = "") -> None:
        """The antenna's name; state 'outlier' frames the panel red, 'flagged' says so across it."""
        self.name, self.state = name, state


def _limits(values: list) -> tuple[float, float]:
    """A shared axis range over the finite values, with matplotlib's 5 % margins."""
    finite = [v[np.isfinite(v)] for v in values if np.size(v)]
    finite = [v for v in finite if v.size]
    if not finite:
        return 0.0, 1.0
    lo = min(float(v.min()) for v in finite)
    hi = max(float(v.max()) for v in finite)
    if hi == lo:
        half = abs(lo) * 0.05 or 0.5
        return lo - half, hi + half
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _runs(x: np.ndarray, y: np.ndarray) -> list:
    """The (x, y) polyline cut where either is not finite, as (n, 2) pieces of 2+ points."""
    ok = np.isfinite(x) & np.isfinite(y)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    return [np.column_stack([x[a:b], y[a:b]]) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 2]


class PanelGrid:
    """n panels in an about square grid, shared axes; ``to_figure`` draws them."""

    def __init__(self, n: int, title: str, panel_in: float = 1.9):
        self.panels = [Panel() for _ in range(n)]
        self.title, self.panel_in = title, panel_in
        self.ncol = max(1, math.ceil(math.sqrt(n * 1.3)))
        self.nrow = max(1, math.ceil(n / self.ncol))
        self.xlabel = self.ylabel = ""

    def _box(self, i: int) -> tuple[float, float, float, float]:
        """Panel i's data box (x0, y0, width, height) in the Axes' grid units."""
        row, col = divmod(i, self.ncol)
        return col + LEFT, self.nrow - 1 - row + BOTTOM, 1 - LEFT - RIGHT, 1 - BOTTOM - TOP

    def limits(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The x and y ranges every panel shares: all that any panel shows, with margins."""
        ps = self.panels
        return (_limits([d[0] for p in ps for d in p.lines + p.points] + [np.array(s[:2]) for p in ps for s in p.spans]),
                _limits([d[1] for p in ps for d in p.lines + p.points] + [np.array([h[0]]) for p in ps for h in p.hlines]))

    def to_figure(self):
        from matplotlib.collections import LineCollection, PolyCollection
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
        # margins (inches) for the tick labels and axis labels of the outer panels and the
        # title: the figure needs no bbox_inches="tight" (which draws it twice)
        left, bottom, top = 0.5, 0.4, 0.4
        width, height = self.panel_in * self.ncol, 0.8 * self.panel_in * self.nrow
        fig = Figure(figsize=(width + left, height + bottom + top))
        ax = fig.add_axes((left / (width + left), bottom / (height + bottom + top),
                           width / (width + left), height / (height + bottom + top)))
        ax.set_xlim(0, self.ncol)
        ax.set_ylim(0, self.nrow)
        ax.set_axis_off()
        fig.suptitle(self.title, fontsize=9)
        ps = self.panels
        (x0, x1), (y0, y1) = self.limits()

        def place(i, x, y):
            bx, by, w, h = self._box(i)
            return bx + (np.asarray(x) - x0) / (x1 - x0) * w, by + (np.asarray(y) - y0) / (y1 - y0) * h

        lines, points, spans = {}, {}, {}
        for i, p in enumerate(ps):
            bx, by, w, h = self._box(i)
            for x, y, colour, lw in p.lines:
                lines.setdefault((colour, lw), []).extend(_runs(*place(i, x, y)))
            for y, colour, lw in p.hlines:
                at = place(i, 0, y)[1]
                lines.setdefault((colour, lw), []).append(np.array([[bx, at], [bx + w, at]]))
            for x, y, colour, ms in p.points:
                px, py = place(i, x, y)
                ok = np.isfinite(px) & np.isfinite(py)
                points.setdefault((colour, ms), []).append(np.column_stack([px[ok], py[ok]]))
            for a, b, colour in p.spans:
                (sa, sb), _ = place(i, [a, b], [y0, y0])
                spans.setdefault(colour, []).append([(sa, by), (sb, by), (sb, by + h), (sa, by + h)])
        for colour, polys in spans.items():
            ax.add_collection(PolyCollection(polys, facecolors=colour, edgecolors="none", zorder=1))
        for (colour, lw), segs in lines.items():
            ax.add_collection(LineCollection(segs, colors=colour, linewidths=lw, zorder=2))
        for (colour, ms), xy in points.items():
            xy = np.concatenate(xy)
            ax.plot(xy[:, 0], xy[:, 1], ".", ms=ms, color=colour, zorder=3, linestyle="none")
        self._frames(ax, LineCollection)
        self._ticks(ax, LineCollection, MaxNLocator(4).tick_values(x0, x1), MaxNLocator(4).tick_values(y0, y1),
                    (x0, x1), (y0, y1))
        if self.xlabel:
            fig.text(0.5, 0.02, self.xlabel, ha="center", va="bottom", fontsize=7)
        if self.ylabel:
            fig.text(0.01, 0.5, self.ylabel, ha="left", va="center", rotation=90, fontsize=7)
        return fig

    def _frames(self, ax, LineCollection) -> None:
        """Each panel's frame (red and thick for an outlier), its name above, and 'all
        flagged' across a flagged one."""
        frames = {}
        for i, p in enumerate(self.panels):
            bx, by, w, h = self._box(i)
            box = np.array([[bx, by], [bx + w, by], [bx + w, by + h], [bx, by + h], [bx, by]])
            style = ("tab:red", 2.0) if p.state == "outlier" else ("black", 0.8)
            frames.setdefault(style, []).append(box)
            colour = STATE_COLOUR.get(p.state, "black")
            if p.name:
                ax.text(bx + w / 2, by + h + 0.02, p.name + (f" ({p.state})" if p.state else ""), ha="center",
                        va="bottom", fontsize=7, color=colour)
            if p.state == "flagged":
                ax.text(bx + w / 2, by + h / 2, "all flagged", ha="center", va="center", fontsize=7, color="0.5")
        for (colour, lw), boxes in frames.items():
            ax.add_collection(LineCollection(boxes, colors=colour, linewidths=lw, zorder=4))

    def _ticks(self, ax, LineCollection, xt, yt, xr, yr) -> None:
        """Tick marks on every panel, tick labels on the first column and the bottom panels
        (those with no panel below), as shared axes label them."""
        xt = [v for v in xt if xr[0] <= v <= xr[1]]
        yt = [v for v in yt if yr[0] <= v <= yr[1]]
        fmt = _tick_format(xt), _tick_format(yt)
        marks = []
        n = len(self.panels)
        for i in range(n):
            bx, by, w, h = self._box(i)
            for v in xt:
                x = bx + (v - xr[0]) / (xr[1] - xr[0]) * w
                marks.append([(x, by), (x, by + 0.03)])
                if i + self.ncol >= n:
                    ax.text(x, by - 0.02, fmt[0](v), ha="center", va="top", fontsize=6)
            for v in yt:
                y = by + (v - yr[0]) / (yr[1] - yr[0]) * h
                marks.append([(bx, y), (bx + 0.03, y)])
                if i % self.ncol == 0:
                    ax.text(bx - 0.02, y, fmt[1](v), ha="right", va="center", fontsize=6)
        ax.add_collection(LineCollection(marks, colors="black", linewidths=0.6, zorder=4))

    def savefig(self, path, **savefig) -> None:
        """As Figure.savefig; the grid has its margins, so bbox_inches is not needed."""
        savefig.pop("bbox_inches", None)
        self.to_figure().savefig(path, **savefig)


def _tick_format(ticks: list):
    """A formatter showing the ticks with as many decimals as their spacing needs."""
    step = min((abs(b - a) for a, b in zip(ticks, ticks[1:])), default=1.0) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return lambda v: f"{v:.{decimals}f}"
