"""Particles of one material each: a volume split into particles with uniform (n_e, n_o) and an
occupancy per voxel.

An LC droplet or an isotropic bead is one material, so its n_e and n_o are the same everywhere in
it; only the director varies (the simulator's truth is built so, and so are emulsions of a liquid
crystal). A reconstruction is not: its indices wander inside a particle and blur at its surface.
:func:`segment_particles` reads the particles off a volume:

* **cores**: voxels deeper than ``core_erosion_voxels`` (city-block distance) inside the region
  where the indices differ from the medium's by more than ``threshold``
  (``|n_e - n_m| + |n_o - n_m|``), split into birefringent and isotropic cores by ``n_e - n_o``
  averaged over each voxel's 3^3 neighbourhood (above ``birefringence_threshold`` or not), each
  connected piece one particle. Erosion separates touching particles at their neck, and the split
  separates an isotropic bead touching a droplet. The threshold is low (0.001) because the network's
  isotropy gate gives isotropic cores ``n_e - n_o`` of 0.0001 while a droplet's can fall to a few
  thousandths where its director is along the axis (measured on the held-out sets: 1.7 % of
  droplet voxels below 0.001 with several droplets, 6.6 % below 0.004). A particle too small to
  keep a core is its own core (of the class of its median); specks of fewer than
  ``min_particle_voxels`` voxels are the medium;
* **split** (with ``shape="spheroid"``): a particle unlike its moment spheroid (below) whose core,
  eroded by up to ``split_erosion_voxels`` more voxels, falls into pieces that together are more
  like spheroids, is split into those pieces: two droplets that the reconstruction blurs into one
  across a gap keep their own levels (on the multi-droplet held-out set, one pass: n_e +0.6 dB,
  up to +4 dB on a field; a convex particle's core stays whole under erosion, so the held-out
  single droplets are unchanged);
* **levels**: each particle's (n_e, n_o) is the median over its core; an isotropic particle has
  one index, the median of ``(n_e + n_o) / 2``;
* **occupancy**: every voxel within ``growth_voxels`` of the region belongs to its nearest core's
  particle, with the share of it that the particle fills,
  ``((n_e - n_m) + (n_o - n_m)) / ((n_e,k - n_m) + (n_o,k - n_m))`` clipped to [0, 1], and 1 in
  the core.

* **shape** (``shape="spheroid"``, the default): each particle's occupancy is replaced by the solid
  spheroid with the same volume, centroid and principal second moments (a sphere when its moments'
  axes differ by less than ``sphere_tolerance``), voxelized with the simulator's partial volumes,
  unless that spheroid differs from the particle's own occupancy by more than
  ``max_shape_mismatch`` (``sum |f_s - f| / sum f``: a merged pair, a particle cut by the field's
  edge), which then keeps its voxels. A small particle's surface is large for its volume, so the
  share also admits a spheroid whose surface lies within ``max_surface_error_voxels`` (lateral)
  of the occupancy's on average (``sum |f_s - f|`` x the voxel's volume / the spheroid's area),
  up to twice ``max_shape_mismatch``. A droplet is a sphere by surface tension, or a spheroid
  when stretched along one axis; the network's moments are right to 1-3 % where its surface wanders
  by a voxel (docs/reconstruction.md, measured on the held-out sets). ``shape="voxels"`` keeps the
  occupancy read off the volume.

A voxel's tensor is then ``n_m^2 I + f (eps_k(d) - n_m^2 I)``: the partial-volume mixture that the
simulator's voxels hold at a surface (:func:`~biref_sdk.samples.tensor.voxelize_droplets`).
:func:`uniform_particles` rebuilds a volume from that split; the physics refinement's
``particles`` model fits the levels, the director and optionally the occupancy to the measured
fields (:mod:`.refine`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..files import Volume
from ..samples.droplets import Droplet
from ..samples.tensor import voxelize_droplets
from .base import ReconstructionSession, Reconstructor

log = logging.getLogger(__name__)

MAX_PROPAGATION_STEPS = 512  # connected-component labelling: bounded by the longest path in a particle
SHAPES = ("spheroid", "voxels")


@dataclass(frozen=True)
class ParticleMap:
    """``owner`` int64[Z, Y, X] (0: medium, k: particle k), ``occupancy`` float32[Z, Y, X] in [0, 1]
    (0 outside particles), ``ne``, ``no`` float64[K]: particle k's levels at index k - 1."""

    owner: np.ndarray
    occupancy: np.ndarray
    ne: np.ndarray
    no: np.ndarray
    shapes: tuple[str, ...] = ()  # per particle: "sphere", "spheroid" or "voxels" (its occupancy as read)
    spheroids: tuple = ()         # per particle: its spheroid (a uniform ``Droplet``), or None for "voxels"

    @property
    def count(self) -> int:
        return len(self.ne)

    def indices(self, medium_index: float) -> tuple[np.ndarray, np.ndarray]:
        """(n_e, n_o) volumes: each voxel the mixture of its particle and the medium, in the
        permittivity (n^2), as at a droplet's surface in the simulator."""
        medium = medium_index**2
        inside = self.owner > 0
        if not self.count:
            return (np.full(self.owner.shape, medium_index, np.float32),) * 2
        level = np.maximum(self.owner - 1, 0)
        f = self.occupancy.astype(np.float64)
        ne = np.sqrt(medium + f * (self.ne[level] ** 2 - medium))
        no = np.sqrt(medium + f * (self.no[level] ** 2 - medium))
        return (np.where(inside, ne, medium_index).astype(np.float32),
                np.where(inside, no, medium_index).astype(np.float32))


def dilate(mask: torch.Tensor, voxels: int = 1) -> torch.Tensor:
    """Grown by ``voxels`` steps to the 6 face neighbours (within that city-block distance)."""
    grown = mask.clone()
    for _ in range(voxels):
        step = grown.clone()
        for axis in range(3):
            step |= F.pad(grown.narrow(axis, 1, grown.shape[axis] - 1).float()[None, None],
                          _pad(axis, (0, 1)))[0, 0] > 0
            step |= F.pad(grown.narrow(axis, 0, grown.shape[axis] - 1).float()[None, None],
                          _pad(axis, (1, 0)))[0, 0] > 0
        grown = step
    return grown


def _pad(axis: int, before_after: tuple[int, int]) -> tuple[int, ...]:
    """F.pad's argument (last axis first) that pads ``axis`` of a [Z, Y, X] volume."""
    padding = [0] * 6
    padding[2 * (2 - axis)], padding[2 * (2 - axis) + 1] = before_after
    return tuple(padding)


def _erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    return ~dilate(~mask, voxels) if voxels else mask


def _spread(labels: torch.Tensor, within: torch.Tensor, steps: int) -> torch.Tensor:
    """Labels [Z, Y, X] (0: none) grown one voxel per step into ``within`` where still 0 (the larger
    label wins a tie), until nothing changes or after ``steps``."""
    labels = labels.clone()
    for _ in range(steps):
        grown = F.max_pool3d(labels[None, None].double(), 3, stride=1, padding=1)[0, 0].long()
        update = (labels == 0) & within & (grown > 0)
        if not bool(update.any()):
            break
        labels[update] = grown[update]
    return labels


def label_components(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Connected components (26-connected) of bool[Z, Y, X]: (labels 1..K, 0 outside; K)."""
    ids = torch.arange(1, mask.numel() + 1, dtype=torch.float64).reshape(mask.shape) * mask
    for _ in range(MAX_PROPAGATION_STEPS):
        grown = F.max_pool3d(ids[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(grown, ids):
            break
        ids = grown
    unique, labels = torch.unique(ids.long(), return_inverse=True)
    if unique[0] != 0:  # every voxel is in a component
        labels = labels + 1
    return labels.reshape(mask.shape), int((unique > 0).sum())


def _without_specks(labels: torch.Tensor, count: int, min_voxels: int) -> tuple[torch.Tensor, int]:
    """Components of fewer than ``min_voxels`` voxels unlabelled, the rest renumbered 1..K."""
    sizes = torch.bincount(labels.flatten(), minlength=count + 1)
    large = sizes >= min_voxels
    large[0] = False
    renumbered = torch.cumsum(large, 0) * large
    return renumbered[labels], int(large.sum())


def segment_particles(volume: Volume, threshold: float = 3e-3, core_erosion_voxels: int = 2,
                      growth_voxels: int = 2, birefringence_threshold: float = 1e-3,
                      min_particle_voxels: int = 4, shape: str = "spheroid", sphere_tolerance: float = 0.1,
                      max_shape_mismatch: float = 0.15, max_surface_error_voxels: float = 0.75,
                      split_erosion_voxels: int = 4) -> ParticleMap:
    """The particles of ``volume`` (module docstring)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    nm = volume.medium_index
    ne, no = torch.as_tensor(volume.ne, dtype=torch.float64), torch.as_tensor(volume.no, dtype=torch.float64)
    mask = ((ne - nm).abs() + (no - nm).abs()) > threshold
    core = _erode(mask, core_erosion_voxels)
    # each core voxel's class by its neighbourhood's mean, so that noise does not split a particle
    local = F.avg_pool3d((ne - no)[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    birefringent = local > birefringence_threshold
    cores_b, count_b = _without_specks(*label_components(core & birefringent), min_particle_voxels)
    cores_i, count_i = _without_specks(*label_components(core & ~birefringent), min_particle_voxels)
    cores = torch.where(cores_b > 0, cores_b, torch.where(cores_i > 0, cores_i + count_b, 0))
    count = count_b + count_i
    coreless, count_c = _without_specks(*label_components(mask & ~dilate(cores > 0, core_erosion_voxels + 1)),
                                        min_particle_voxels)
    cores = torch.where(coreless > 0, coreless + count, cores)
    isotropic = [k > count_b for k in range(1, count + 1)]
    # a particle without a core is of the class of its median
    isotropic += [float(local[coreless == k].median()) <= birefringence_threshold for k in range(1, count_c + 1)]
    region = dilate(mask, growth_voxels) if growth_voxels else mask
    read = _ParticleReader(ne, no, region, nm)
    particles = read(cores, isotropic)
    if shape != "spheroid":
        return particles
    shaped = spheroid_shapes(particles, volume.voxel_size_m, nm, sphere_tolerance, max_shape_mismatch,
                             max_surface_error_voxels)
    unlike = [k for k, kind in enumerate(shaped.shapes, 1) if kind == "voxels"]
    if split_erosion_voxels and unlike:  # only those unlike a spheroid are tried: most volumes have none
        split = _split_merged(read, particles, cores, isotropic, unlike, volume.voxel_size_m, sphere_tolerance,
                              max_shape_mismatch, split_erosion_voxels, min_particle_voxels)
        if split is not particles:
            shaped = spheroid_shapes(split, volume.voxel_size_m, nm, sphere_tolerance, max_shape_mismatch,
                                     max_surface_error_voxels)
    return shaped


class _ParticleReader:
    """A volume's particles given their cores: each one's levels (medians over its core; one index
    for an isotropic particle), its voxels (the region's, to the nearest core) and occupancy."""

    def __init__(self, ne: torch.Tensor, no: torch.Tensor, region: torch.Tensor, medium_index: float) -> None:
        self.ne, self.no, self.region, self.medium_index = ne, no, region, medium_index

    def __call__(self, cores: torch.Tensor, isotropic: list[bool]) -> ParticleMap:
        ne, no, nm = self.ne, self.no, self.medium_index
        count = len(isotropic)
        ne_k, no_k = np.zeros(count), np.zeros(count)
        for k in range(1, count + 1):
            core_k = cores == k
            if isotropic[k - 1]:
                ne_k[k - 1] = no_k[k - 1] = float((0.5 * (ne + no))[core_k].median())
            else:
                ne_k[k - 1], no_k[k - 1] = float(ne[core_k].median()), float(no[core_k].median())
        owner = torch.where(self.region, _spread(cores, self.region, MAX_PROPAGATION_STEPS), 0)
        contrast = torch.as_tensor(np.r_[1.0, (ne_k - nm) + (no_k - nm)])[owner]
        contrast = torch.where(contrast.abs() < 1e-6, 1e-6, contrast)
        occupancy = torch.where(owner > 0, (((ne - nm) + (no - nm)) / contrast).clamp(0, 1), 0.0)
        occupancy = torch.where(cores > 0, 1.0, occupancy)  # a core is inside its particle by construction
        return ParticleMap(owner=owner.numpy(), occupancy=occupancy.float().numpy(), ne=ne_k, no=no_k,
                           shapes=("voxels",) * count)


def _split_merged(read: _ParticleReader, particles: ParticleMap, cores: torch.Tensor, isotropic: list[bool],
                  unlike: list[int], voxel_size_m, sphere_tolerance: float, max_shape_mismatch: float,
                  max_erosion_voxels: int, min_particle_voxels: int) -> ParticleMap:
    """``particles`` with each one of ``unlike`` (those unlike their moment spheroid) split where its
    core, eroded by 1 to ``max_erosion_voxels`` more voxels, falls into pieces that are more like
    spheroids together: two droplets that the reconstruction blurs into one keep their own levels
    and shapes. The core's erosion keeps pieces at a neck narrower than the particles; a convex
    particle's core stays whole under erosion. ``particles`` itself where none is split."""
    nm = read.medium_index
    original = particles
    for k in range(1, original.count + 1):
        if particles is original and k not in unlike:  # known like its spheroid, unless a split re-read it
            continue
        before = _spheroid_misfit(particles, k, voxel_size_m, nm, sphere_tolerance)
        if before is None or before[0] <= max_shape_mismatch * before[1]:
            continue
        core_k = cores == k
        for extra in range(1, max_erosion_voxels + 1):
            pieces, count = _without_specks(*label_components(_erode(core_k, extra)), min_particle_voxels)
            if count == 0:
                break
            if count < 2:
                continue
            last = len(isotropic)
            trial_cores = torch.where(pieces > 1, pieces - 1 + last, torch.where(pieces == 1, k, cores * ~core_k))
            trial_isotropic = isotropic + [isotropic[k - 1]] * (count - 1)
            trial = read(trial_cores, trial_isotropic)
            misfits = [_spheroid_misfit(trial, j, voxel_size_m, nm, sphere_tolerance)
                       for j in [k, *range(last + 1, last + count)]]
            if all(m is not None for m in misfits) and sum(m[0] for m in misfits) < before[0]:
                log.debug("particle %d split into %d at %d more voxels of erosion", k, count, extra)
                cores, isotropic, particles = trial_cores, trial_isotropic, trial
                break
    return particles


def _spheroid_misfit(particles: ParticleMap, k: int, voxel_size_m, medium_index: float,
                     sphere_tolerance: float) -> tuple[float, float] | None:
    """(sum |spheroid - occupancy|, sum occupancy) of particle ``k`` and its moment spheroid, or None
    for an empty particle."""
    own = np.where(particles.owner == k, particles.occupancy, 0.0).astype(np.float64)
    if own.sum() <= 0:
        return None
    _, spheroid = _moment_shape(own, voxel_size_m, medium_index, sphere_tolerance)
    return float(np.abs(spheroid - own).sum()), float(own.sum())


def _moment_shape(own: np.ndarray, voxel_size_m, medium_index: float, sphere_tolerance: float):
    """(the moment spheroid of the occupancy ``own``, the share of each voxel inside it, voxelized as
    the simulator does)."""
    droplet = moment_spheroid(own, voxel_size_m, medium_index, sphere_tolerance)
    eps = voxelize_droplets([droplet], own.shape, voxel_size_m, medium_index)[0].double().numpy()
    return droplet, (eps - medium_index**2) / (droplet.no**2 - medium_index**2)


def _moments(weight: np.ndarray, voxel_size_m) -> tuple[float, np.ndarray, np.ndarray]:
    """(volume in m^3, centroid (z, y, x) in m, second-moment matrix in m^2) of an occupancy."""
    axes = [(np.arange(n) - n / 2) * d for n, d in zip(weight.shape, voxel_size_m)]  # voxel_centres_m
    mass = weight.sum()
    marginals = [weight.sum(axis=tuple(a for a in range(3) if a != i)) for i in range(3)]
    centroid = np.array([(m * x).sum() / mass for m, x in zip(marginals, axes)])
    grids = np.meshgrid(*[x - c for x, c in zip(axes, centroid)], indexing="ij", sparse=True)
    second = np.array([[(grids[i] * grids[j] * weight).sum() / mass for j in range(3)] for i in range(3)])
    return float(mass * np.prod(voxel_size_m)), centroid, second


def moment_spheroid(weight: np.ndarray, voxel_size_m, medium_index: float, sphere_tolerance: float) -> Droplet:
    """The solid spheroid with the volume, centroid and principal second moments of ``weight`` (a solid
    ellipsoid's second moments are semi-axis^2 / 5): its one distinct axis along the eigenvector
    whose semi-axis stands out from the other two, which are averaged; a sphere when the semi-axes
    differ by less than ``sphere_tolerance``. Returned as a uniform ``Droplet`` (indices unused but
    valid) so that it is voxelized exactly as the simulator's droplets."""
    volume_m3, centroid, second = _moments(weight, voxel_size_m)
    values, vectors = np.linalg.eigh(second)
    # at least a voxel's own spread (a uniform box: d^2 / 12): a particle one voxel thick is not flat.
    # Only there: elsewhere the partial volumes already carry the voxels' spread (adding it to every
    # axis made the radii of voxelized spheroids 0.2-0.8 % worse)
    semi = np.sqrt(5 * np.maximum(values, min(voxel_size_m) ** 2 / 12))
    axis_zyx, aspect = vectors[:, 2], 1.0
    if semi[2] > (1 + sphere_tolerance) * max(semi[0], 1e-30):
        if semi[2] - semi[1] >= semi[1] - semi[0]:   # prolate: one long axis
            aspect = semi[2] / np.sqrt(semi[0] * semi[1])
        else:                                         # oblate: one short axis
            axis_zyx, aspect = vectors[:, 0], semi[0] / np.sqrt(semi[1] * semi[2])
    radius = (3 * volume_m3 / (4 * np.pi * aspect)) ** (1 / 3)
    return spheroid_droplet(centroid, radius, aspect, axis_zyx, medium_index)


def spheroid_droplet(centre_zyx_m, radius_m: float, aspect: float, axis_zyx, medium_index: float) -> Droplet:
    """A spheroid (centre and axis in (z, y, x)) as a uniform ``Droplet``, whose indices are unused
    but valid, so that it is voxelized exactly as the simulator's droplets."""
    return Droplet(center_m=tuple(float(c) for c in centre_zyx_m[::-1]), radius_m=float(radius_m),
                   axis=tuple(float(a) for a in axis_zyx[::-1]), configuration="uniform",
                   ne=medium_index + 0.1, no=medium_index + 0.1, aspect=float(aspect))


def spheroid_area_m2(droplet: Droplet) -> float:
    """The surface area of a spheroid ``Droplet`` (Knud Thomsen's formula, within 1.1 %; exact for a sphere)."""
    a, c, p = droplet.radius_m, droplet.radius_m * droplet.aspect, 1.6075
    return float(4 * np.pi * ((a ** (2 * p) + 2 * (a * c) ** p) / 3) ** (1 / p))


def spheroid_shapes(particles: ParticleMap, voxel_size_m, medium_index: float, sphere_tolerance: float = 0.1,
                    max_shape_mismatch: float = 0.15, max_surface_error_voxels: float = 0.75) -> ParticleMap:
    """``particles`` with each one's occupancy replaced by its moment spheroid where that spheroid
    differs from it by at most ``max_shape_mismatch`` (module docstring); a voxel two spheroids
    share belongs to the fuller one."""
    owner, occupancy = particles.owner.copy(), particles.occupancy.astype(np.float64)
    shapes = list(particles.shapes or ("voxels",) * particles.count)
    spheroids = list(particles.spheroids or (None,) * particles.count)
    for k in range(1, particles.count + 1):
        own = np.where(particles.owner == k, particles.occupancy, 0.0).astype(np.float64)
        if own.sum() <= 0:
            continue
        droplet, spheroid = _moment_shape(own, voxel_size_m, medium_index, sphere_tolerance)
        mismatch = np.abs(spheroid - own).sum()
        surface_error_m = mismatch * np.prod(voxel_size_m) / spheroid_area_m2(droplet)
        # a small particle's surface is large for its volume: there the share can exceed the limit
        # while the surface lies within a voxel of the spheroid's (up to twice the share: a speck's
        # surface error is small whatever its shape)
        near = (surface_error_m <= max_surface_error_voxels * min(voxel_size_m)
                and mismatch <= 2 * max_shape_mismatch * own.sum())
        if mismatch > max_shape_mismatch * own.sum() and not near:
            continue
        shapes[k - 1] = "sphere" if droplet.aspect == 1.0 else "spheroid"
        spheroids[k - 1] = droplet
        released = owner == k
        owner[released], occupancy[released] = 0, 0.0
        take = (spheroid > 1e-6) & (spheroid > occupancy)
        owner[take], occupancy[take] = k, spheroid[take]
    return ParticleMap(owner=owner, occupancy=occupancy.astype(np.float32), ne=particles.ne, no=particles.no,
                       shapes=tuple(shapes), spheroids=tuple(spheroids))


def soft_spheroid_occupancy(centre_m: torch.Tensor, radius_m: torch.Tensor, aspect: torch.Tensor,
                            axis: torch.Tensor, coordinates_m, voxel_size_m, supersample: int = 3) -> torch.Tensor:
    """The share of each voxel [Z, Y, X] of the grid ``coordinates_m`` (voxel centres z, y, x) inside a
    spheroid (centre and axis in (z, y, x)), differentiable in its parameters: the simulator's
    ``supersample``^3 points per voxel, each inside by a logistic step of the distance to the surface
    whose width is a tenth of the points' spacing (measured on a simulator-voxelized spheroid: 0.6 %
    of its volume differs from the hard partial volumes; the step's gradient is what lets a fit
    move the surface)."""
    s = supersample
    offsets = (torch.arange(s, dtype=centre_m.dtype, device=centre_m.device) + 0.5) / s - 0.5
    points = [(torch.as_tensor(c, dtype=centre_m.dtype, device=centre_m.device)[:, None] + offsets * d).reshape(-1)
              - c0 for c, d, c0 in zip(coordinates_m, voxel_size_m, centre_m)]
    z, y, x = torch.meshgrid(*points, indexing="ij")
    along = z * axis[0] + y * axis[1] + x * axis[2]
    across2 = (z**2 + y**2 + x**2 - along**2).clamp_min(0)
    rho = torch.sqrt(across2 / radius_m**2 + (along / (aspect * radius_m)) ** 2 + 1e-30)
    width = 0.1 * min(voxel_size_m) / s
    inside = torch.sigmoid((1 - rho) * radius_m * torch.clamp(aspect, max=1.0) / width)
    shape = [len(c) for c in coordinates_m]
    return inside.reshape(shape[0], s, shape[1], s, shape[2], s).mean(dim=(1, 3, 5))


def uniform_particles(volume: Volume, **segment_options) -> Volume:
    """``volume`` with every particle one material: its levels, its occupancy (module docstring).
    The director and the uncertainty stay; ``parameters["particles"]`` records the levels."""
    particles = segment_particles(volume, **segment_options)
    ne, no = particles.indices(volume.medium_index)
    return Volume(ne=ne, no=no, director=volume.director, voxel_size_m=volume.voxel_size_m,
                  medium_index=volume.medium_index, uncertainty=volume.uncertainty,
                  parameters={**volume.parameters, "particles": particle_report(particles)})


def particle_report(particles: ParticleMap) -> dict:
    return {"count": particles.count, "shapes": list(particles.shapes),
            "ne": [round(float(x), 5) for x in particles.ne],
            "no": [round(float(x), 5) for x in particles.no],
            "voxels": [int(v) for v in np.bincount(particles.owner.ravel(), minlength=particles.count + 1)[1:]]}


class UniformParticlesSession(ReconstructionSession):
    """Feeds the wrapped session; ``finalize`` rebuilds its volume as uniform particles."""

    def __init__(self, inner: ReconstructionSession, options: dict) -> None:
        super().__init__(inner.geometry)
        self.inner = inner
        self._options = options

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        self.inner.add_view(polarization, view, hologram)

    def finalize(self, allow_missing: bool = False) -> Volume:
        return uniform_particles(self.inner.finalize(allow_missing=allow_missing), **self._options)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class UniformParticles(Reconstructor):
    """Any reconstructor whose volumes are rebuilt as particles of one material each
    (:func:`uniform_particles`; tenths of a second for ``small`` on one CPU core)."""

    def __init__(self, inner: Reconstructor, **segment_options) -> None:
        self.inner = inner
        self.name = f"{inner.name}+particles"
        self._options = segment_options

    def session_bytes(self, geometry) -> int:
        return int(self.inner.session_bytes(geometry))

    def start(self, geometry, background: np.ndarray) -> UniformParticlesSession:
        return UniformParticlesSession(self.inner.start(geometry, background), self._options)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
