"""A droplet's director as one of the closed-form nematic configurations, fitted to a reconstruction.

A nematic droplet takes one of a few director configurations (bipolar, twisted bipolar, radial,
preradial, uniform: :mod:`biref_sdk.samples.droplets`), set by its anchoring and size. A
reconstruction's director follows the right one only approximately: the missing cone blurs its
component along the optical axis, voxel by voxel. :func:`fit_configuration` finds the configuration,
its axis and its one shape number (the twist at the rim, the hedgehog's offset) whose closed form
agrees best with the director inside a spheroid particle, scored by the mean ``cos^2`` of the angle
between them (sign-free, 1 when they agree everywhere); :func:`configured_director` puts the closed
form in place of a particle's voxels where the score is high enough. Particles the closed forms do
not fit (a droplet cut by the field's edge, a defect the forms do not have, a sample that is no
nematic droplet) keep their director.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..samples.droplets import Droplet, director_field
from ..samples.tensor import voxel_centres_m
from .particles import ParticleMap

log = logging.getLogger(__name__)

#: The closed form replaces the director only where it agrees this well (mean cos^2; 0.8 is an
#: RMS angle of about 26 degrees). Validation: docs/reconstruction.md, "Director configurations".
MIN_AGREEMENT = 0.8
TWISTS_RAD = (-1.6, -1.1, -0.6, 0.6, 1.1, 1.6)   # coarse grid of the rim's twist, either handedness
DEFECT_OFFSETS = (0.3, 0.5, 0.7)                  # coarse grid of the preradial hedgehog's offset (radii)


@dataclass(frozen=True)
class ConfigurationFit:
    """The closed form that fits a particle best: ``droplet`` holds its configuration, axis, twist
    or offset on the particle's spheroid; ``agreement`` the mean cos^2 against the director."""

    droplet: Droplet
    agreement: float


def _directions(count: int) -> np.ndarray:
    """``count`` unit vectors (x, y, z) spread evenly over the upper half sphere (a Fibonacci lattice):
    the axis of a configuration and its reverse give directors of opposite sign only, except for
    twist and offset, whose signs the grids already carry."""
    i = np.arange(count) + 0.5
    polar = np.arccos(1 - i / count)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)


def _near(axis: np.ndarray, half_angle_rad: float, steps: int) -> list[np.ndarray]:
    """``axis`` and a ring grid of directions around it within ``half_angle_rad``."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    out = [axis]
    for tilt in np.linspace(0, half_angle_rad, steps + 1)[1:]:
        for turn in np.linspace(0, 2 * np.pi, 8, endpoint=False):
            v = np.cos(tilt) * axis + np.sin(tilt) * (np.cos(turn) * e1 + np.sin(turn) * e2)
            out.append(v / np.linalg.norm(v))
    return out


def _candidates(spheroid: Droplet, axes, twists, offsets):
    """Closed forms on ``spheroid``: every configuration on every axis, with the twist and offset
    grids. A stretched droplet's configuration axis is its long axis, but a spheroid read off a
    reconstruction has its axis only within some degrees: every axis is tried."""
    yield replace(spheroid, configuration="radial")
    for axis in axes:
        on_axis = replace(spheroid, axis=tuple(axis))
        yield replace(on_axis, configuration="bipolar")
        yield replace(on_axis, configuration="uniform")
        for twist in twists:
            yield replace(on_axis, configuration="twisted_bipolar", twist_rad=float(twist))
        for offset in offsets:
            yield replace(on_axis, configuration="preradial", defect_offset=float(offset))


def _agreement(droplet: Droplet, points_m: torch.Tensor, director: torch.Tensor, weight: torch.Tensor) -> float:
    closed = director_field(droplet, points_m)
    return float((weight * (closed * director).sum(-1) ** 2).sum())


def _best(candidates, points_m, director, weight) -> ConfigurationFit:
    best = None
    for droplet in candidates:
        score = _agreement(droplet, points_m, director, weight)
        if best is None or score > best.agreement:
            best = ConfigurationFit(droplet, score)
    return best


def fit_configuration(director: np.ndarray, weight: np.ndarray, spheroid: Droplet, voxel_size_m,
                      coarse_axes: int = 150) -> ConfigurationFit:
    """The closed-form configuration on ``spheroid`` nearest ``director`` [3 (x, y, z), Z, Y, X] over
    the voxels where ``weight`` [Z, Y, X] > 0 (weighted by it): a coarse search of every
    configuration, axis and shape number, then a finer one around the best (axis within 7 degrees,
    twist and offset between the coarse grid's points)."""
    inside = torch.as_tensor(weight > 0)
    if not bool(inside.any()):
        raise ValueError("the particle has no voxel to fit")
    points_m = _points_m(inside, voxel_size_m)
    d = torch.as_tensor(np.asarray(director, dtype=np.float64))[:, inside].T
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))[inside]
    w = w / w.sum()
    coarse = _best(_candidates(spheroid, _directions(coarse_axes), TWISTS_RAD, DEFECT_OFFSETS), points_m, d, w)
    found = coarse.droplet
    if found.configuration == "radial":
        return coarse
    twists = np.linspace(found.twist_rad - 0.25, found.twist_rad + 0.25, 5)
    offsets = np.clip(np.linspace(found.defect_offset - 0.1, found.defect_offset + 0.1, 5), 0.0, 0.95)
    finer = [replace(found, axis=tuple(a)) for a in _near(np.asarray(found.axis), np.radians(7.0), 3)]
    if found.configuration == "twisted_bipolar":
        finer = [replace(c, twist_rad=float(t)) for c in finer for t in twists]
    elif found.configuration == "preradial":
        finer = [replace(c, defect_offset=float(o)) for c in finer for o in offsets]
    fine = _best(finer, points_m, d, w)
    return fine if fine.agreement > coarse.agreement else coarse


def _points_m(mask: torch.Tensor, voxel_size_m) -> torch.Tensor:
    """The centres (x, y, z) in metres [N, 3] of the voxels where ``mask`` [Z, Y, X]."""
    z, y, x = voxel_centres_m(tuple(mask.shape), voxel_size_m)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx[mask], yy[mask], zz[mask]], -1).double()


def _touches_edge(mask: np.ndarray) -> bool:
    return any(mask.take(i, axis=a).any() for a in range(3) for i in (0, -1))


def configured_director(director: np.ndarray, particles: ParticleMap, voxel_size_m, birefringent,
                        min_agreement: float = MIN_AGREEMENT) -> tuple[np.ndarray, list[dict]]:
    """``director`` [3, Z, Y, X] with each birefringent spheroid particle's voxels set to its fitted
    closed form where it agrees at least ``min_agreement`` (:func:`fit_configuration` over the
    voxels the particle fills more than half), and a report per particle tried. A particle whose
    full voxels reach the volume's edge is not tried. ``birefringent``: per particle, whether it
    has a director at all (an isotropic bead has none)."""
    out = np.array(director, dtype=np.float32, copy=True)
    report = []
    for k, spheroid in enumerate(particles.spheroids or (), 1):
        if spheroid is None or not birefringent[k - 1]:
            continue
        own = (particles.owner == k) & (particles.occupancy > 0)
        weight = np.where(own & (particles.occupancy > 0.5), particles.occupancy, 0.0)
        if not weight.any() or _touches_edge(weight > 0):
            continue  # a particle cut by the edge: its spheroid was read off the cut shape
        fit = fit_configuration(director, weight, spheroid, voxel_size_m)
        used = fit.agreement >= min_agreement
        report.append({"particle": k, "configuration": fit.droplet.configuration,
                       "axis": list(fit.droplet.axis), "twist_rad": fit.droplet.twist_rad,
                       "defect_offset": fit.droplet.defect_offset, "agreement": fit.agreement, "used": used})
        if used:
            out[:, own] = director_field(fit.droplet, _points_m(torch.as_tensor(own), voxel_size_m)).T.numpy()
    log.debug("director configurations: %s", report)
    return out, report
