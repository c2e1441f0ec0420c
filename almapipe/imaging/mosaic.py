"""The geometry of a mosaic: several pointings (fields) of one source imaged jointly
on one grid (measurement.JointMosaic does the imaging).

Directions are (ra, dec) in radians. Offsets on the image are the SIN projection
about the image centre, (l east, m north) in radians, as the FITS header's
RA---SIN/DEC--SIN axes read them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Pointing:
    """One pointing of a mosaic: its field; where it lies on the image (l east, m
    north, radians from the image centre: where its primary beam peaks); where the
    image centre lies in its own frame (where its visibilities are moved to); its
    share of the data's weight."""
    field_id: int
    offset_lm: tuple
    centre_lm: tuple
    fraction: float


@dataclass
class Mosaic:
    pointings: list
    dish_m: float
    telescope: str
    centre: tuple            # (ra, dec) of the image centre, radians

    def extent_rad(self) -> float:
        """The largest distance of a pointing from the image centre."""
        return max(float(np.hypot(*p.offset_lm)) for p in self.pointings)


def sin_offset(ra: float, dec: float, ra0: float, dec0: float) -> tuple:
    """(l, m) of the direction (ra, dec) in the SIN projection about (ra0, dec0)."""
    dra = ra - ra0
    l = np.cos(dec) * np.sin(dra)
    m = np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(dra)
    return float(l), float(m)


def mosaic_centre(directions: list) -> tuple:
    """The image centre of a mosaic: the middle of its pointings' extent in RA and
    Dec (the centre of the bounding box, as the ALMA pipeline centres mosaics), RA
    taken about the first pointing so that a mosaic across RA 0 stays whole."""
    ra = np.array([d[0] for d in directions])
    dec = np.array([d[1] for d in directions])
    dra = np.angle(np.exp(1j * (ra - ra[0])))
    return float((ra[0] + (dra.min() + dra.max()) / 2) % (2 * np.pi)), float((dec.min() + dec.max()) / 2)


def make_mosaic(fields: list, weights: list, dish_m: float, telescope: str) -> Mosaic:
    """A Mosaic from its fields [(field id, ra, dec)] and each field's share of the
    data (any positive numbers: the sums of their visibilities' weights)."""
    centre = mosaic_centre([(ra, dec) for _, ra, dec in fields])
    total = float(np.sum(weights)) or 1.0
    pointings = [Pointing(fid, sin_offset(ra, dec, *centre), sin_offset(centre[0], centre[1], ra, dec),
                          float(w) / total)
                 for (fid, ra, dec), w in zip(fields, weights)]
    return Mosaic(pointings, dish_m, telescope, centre)


def direction_of(l: float, m: float, ra0: float, dec0: float) -> tuple:
    """(ra, dec) of the offset (l, m) in the SIN projection about (ra0, dec0):
    the inverse of sin_offset."""
    n = np.sqrt(1.0 - l * l - m * m)
    dec = np.arcsin(m * np.cos(dec0) + n * np.sin(dec0))
    ra = ra0 + np.arctan2(l, n * np.cos(dec0) - m * np.sin(dec0))
    return float(ra % (2 * np.pi)), float(dec)


def hexagonal_offsets(n: int, spacing_rad: float) -> list:
    """(l, m) of n pointings on a hexagonal grid around the centre (the centre, then
    the first ring of six, ...), spacing_rad apart, as ALMA lays out mosaics."""
    out, ring = [(0.0, 0.0)], 1
    while len(out) < n:
        corners = [np.array([np.cos(a), np.sin(a)]) * ring for a in np.radians(np.arange(0, 360, 60))]
        for k in range(6):
            for j in range(ring):
                p = corners[k] + (corners[(k + 1) % 6] - corners[k]) * j / ring
                out.append((float(p[0] * spacing_rad), float(p[1] * spacing_rad)))
        ring += 1
    return out[:n]

