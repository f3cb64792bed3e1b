"""Nematic liquid-crystal droplets: director configurations and random samples.

Each configuration is a closed-form director field in the droplet's own frame, whose z' axis is
``Droplet.axis`` (the bipolar axis, the twist axis, the uniform director, the preradial offset).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CONFIGURATIONS = ("bipolar", "radial", "twisted_bipolar", "preradial", "uniform")


@dataclass(frozen=True)
class Droplet:
    """One droplet. Lengths in metres, centre in (x, y, z) relative to the volume centre."""

    center_m: tuple[float, float, float]
    radius_m: float
    axis: tuple[float, float, float]
    configuration: str
    ne: float
    no: float
    twist_rad: float = 0.0       # twisted bipolar: twist angle reached at the droplet's rim
    defect_offset: float = 0.0   # preradial: hedgehog displaced along the axis, in radii
    aspect: float = 1.0          # spheroid: semi-axis along ``axis`` = aspect * radius_m (1: a sphere)

    @property
    def bounding_radius_m(self) -> float:
        return self.radius_m * max(1.0, self.aspect)

    def __post_init__(self) -> None:
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"unknown director configuration {self.configuration!r}; one of {CONFIGURATIONS}")
        if self.radius_m <= 0:
            raise ValueError("radius_m must be positive")
        if self.aspect <= 0:
            raise ValueError("aspect must be positive")
        if not self.ne >= self.no:
            raise ValueError(f"ne ({self.ne}) must be >= no ({self.no})")
        axis = np.asarray(self.axis, dtype=float)
        object.__setattr__(self, "axis", tuple(float(v) for v in axis / np.linalg.norm(axis)))


def _frame(axis: np.ndarray) -> np.ndarray:
    """Rows (e1, e2, axis): a right-handed orthonormal frame whose third vector is ``axis``."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(helper, axis)
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(axis, e1), axis])


def director_field(droplet: Droplet, points_m: torch.Tensor) -> torch.Tensor:
    """Unit director [..., 3] at ``points_m`` [..., 3] (x, y, z in metres, volume frame)."""
    frame = torch.as_tensor(_frame(np.asarray(droplet.axis)), dtype=points_m.dtype, device=points_m.device)
    center = torch.as_tensor(droplet.center_m, dtype=points_m.dtype, device=points_m.device)
    local = (points_m - center) @ frame.T  # (x', y', z') in the droplet frame
    # A spheroid is the unit droplet stretched along its axis: evaluate the sphere's field at the
    # unstretched point and stretch the direction with it, so surface-tangent (bipolar) lines stay
    # tangent and radial lines stay radial.
    stretch = torch.tensor([1.0, 1.0, droplet.aspect], dtype=local.dtype, device=local.device)
    local = local / stretch
    x, y, z = local.unbind(-1)
    radius = droplet.radius_m
    rho = torch.sqrt(x * x + y * y)
    safe_rho = torch.clamp(rho, min=1e-12 * radius)
    rho_hat = torch.stack([x / safe_rho, y / safe_rho, torch.zeros_like(x)], -1)
    phi_hat = torch.stack([-y / safe_rho, x / safe_rho, torch.zeros_like(x)], -1)
    z_hat = torch.zeros_like(local)
    z_hat[..., 2] = 1.0

    config = droplet.configuration
    if config == "uniform":
        d = z_hat
    elif config == "radial":
        d = local
    elif config == "preradial":
        d = local - torch.as_tensor([0.0, 0.0, droplet.defect_offset * radius], dtype=local.dtype, device=local.device)
    else:
        # Bipolar: field lines are circular arcs through both poles (0, 0, +-R); the tangent of the
        # arc through (rho, z) is proportional to (-2 rho z, R^2 + rho^2 - z^2) in (rho^, z^).
        d = (-2.0 * rho * z)[..., None] * rho_hat + (radius**2 + rho**2 - z**2)[..., None] * z_hat
        if config == "twisted_bipolar":
            d = d / torch.clamp(torch.linalg.vector_norm(d, dim=-1, keepdim=True), min=1e-30)
            twist = droplet.twist_rad * torch.clamp(rho / radius, max=1.0)
            d = torch.cos(twist)[..., None] * d + torch.sin(twist)[..., None] * phi_hat
    d_global = (d * stretch) @ frame  # stretched, back to the volume frame
    norm = torch.linalg.vector_norm(d_global, dim=-1, keepdim=True)
    # the defect points themselves (centre of radial, poles) have no director: pick the axis there
    axis = frame[2].expand_as(d_global)
    return torch.where(norm > 1e-12 * radius**2, d_global / torch.clamp(norm, min=1e-30), axis)


@dataclass(frozen=True)
class DropletDistribution:
    """How random samples are drawn. Radii are fractions of the volume's smallest half-extent.

    The defaults are the original training distribution (one liquid-crystal droplet, wholly inside);
    the optional features draw extra random numbers only when switched on, so a default sample ``i``
    of a seed stays what it always was.
    """

    min_droplets: int = 1
    max_droplets: int = 1
    radius_fraction: tuple[float, float] = (0.4, 0.8)
    configurations: tuple[str, ...] = CONFIGURATIONS
    no_minus_medium: tuple[float, float] = (0.003, 0.012)
    ne_range: tuple[float, float] = (1.556, 1.570)
    min_birefringence: float = 0.008
    twist_rad: tuple[float, float] = (0.5, 1.6)
    defect_offset: tuple[float, float] = (0.3, 0.7)
    isotropic_fraction: float = 0.0       # probability that a particle is isotropic (n_e = n_o)
    isotropic_index: tuple[float, float] = (1.541, 1.570)
    elongated_fraction: float = 0.0       # probability that a particle is a prolate spheroid
    aspect_range: tuple[float, float] = (1.2, 1.6)
    edge_cut_fraction: float = 0.0        # up to this fraction of a radius may lie beyond the lateral edges


#: Named distributions: "single" is the original one; "broad" the training mixture of what a
#: microscope sees; the others are its categories, for held-out sets.
DISTRIBUTIONS: dict[str, DropletDistribution] = {
    "single": DropletDistribution(),
    "single-any-size": DropletDistribution(radius_fraction=(0.3, 0.95), elongated_fraction=0.25),
    "multi": DropletDistribution(min_droplets=2, max_droplets=4, radius_fraction=(0.35, 0.8),
                                 isotropic_fraction=0.25, elongated_fraction=0.2),
    "isotropic": DropletDistribution(min_droplets=1, max_droplets=2, radius_fraction=(0.3, 0.9),
                                     isotropic_fraction=1.0),
    "small": DropletDistribution(radius_fraction=(0.3, 0.45)),
    "large": DropletDistribution(radius_fraction=(0.8, 0.95)),
    "edge": DropletDistribution(min_droplets=1, max_droplets=3, radius_fraction=(0.35, 0.8),
                                isotropic_fraction=0.2, edge_cut_fraction=0.6),
    "elongated": DropletDistribution(radius_fraction=(0.35, 0.6), elongated_fraction=1.0),
}

#: The training mixture: (weight, category) — "broad" draws the category per sample.
BROAD_MIXTURE: tuple[tuple[float, str], ...] = (
    (0.35, "single-any-size"), (0.30, "multi"), (0.15, "isotropic"), (0.20, "edge"))


def distribution_names() -> tuple[str, ...]:
    return (*DISTRIBUTIONS, "broad")


def draw_distribution(rng: np.random.Generator, name: str) -> tuple[str, DropletDistribution]:
    """The category and distribution of one sample of the named distribution."""
    if name == "broad":
        weights = np.array([w for w, _ in BROAD_MIXTURE])
        name = BROAD_MIXTURE[int(rng.choice(len(weights), p=weights / weights.sum()))][1]
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; one of {distribution_names()}")
    return name, DISTRIBUTIONS[name]


def random_droplets(rng: np.random.Generator, volume_extent_m, medium_index: float,
                    distribution: DropletDistribution = DropletDistribution()) -> list[Droplet]:
    """Draw non-overlapping droplets in a box of ``volume_extent_m`` (z, y, x): wholly inside it, or
    cut by its lateral edges when ``edge_cut_fraction`` > 0."""
    half = np.asarray(volume_extent_m, dtype=float)[::-1] / 2  # (x, y, z)
    n = int(rng.integers(distribution.min_droplets, distribution.max_droplets + 1))
    # several droplets share the box: shrink them so that they fit side by side
    shrink = 1.0 / np.cbrt(n)
    droplets: list[Droplet] = []
    for attempt in range(20 * 200 * n):
        if len(droplets) == n:
            break
        if attempt and attempt % (200 * n) == 0:
            droplets = []  # the first ones left no room for the rest: start the field again
        radius = rng.uniform(*distribution.radius_fraction) * half.min() * shrink
        aspect = 1.0
        if distribution.elongated_fraction > 0 and rng.uniform() < distribution.elongated_fraction:
            aspect = float(rng.uniform(*distribution.aspect_range))
            radius = min(radius, 0.95 * half.min() / aspect)
        reach = radius * aspect
        margin = np.full(3, reach)
        if distribution.edge_cut_fraction > 0:
            margin[:2] -= rng.uniform(0.0, distribution.edge_cut_fraction) * radius
        center = rng.uniform(-(half - margin), half - margin)
        if any(np.linalg.norm(center - d.center_m) < reach + d.bounding_radius_m + 1e-9 for d in droplets):
            continue
        axis = rng.normal(size=3)
        no = medium_index + rng.uniform(*distribution.no_minus_medium)
        ne = rng.uniform(max(distribution.ne_range[0], no + distribution.min_birefringence), distribution.ne_range[1])
        configuration = str(rng.choice(distribution.configurations))
        twist, offset = float(rng.uniform(*distribution.twist_rad)), float(rng.uniform(*distribution.defect_offset))
        if distribution.isotropic_fraction > 0 and rng.uniform() < distribution.isotropic_fraction:
            configuration, ne = "uniform", float(rng.uniform(*distribution.isotropic_index))
            no = ne
        droplets.append(Droplet(center_m=tuple(center), radius_m=float(radius), axis=tuple(axis / np.linalg.norm(axis)),
                                configuration=configuration, ne=float(ne), no=float(no),
                                twist_rad=twist, defect_offset=offset, aspect=aspect))
    if len(droplets) < n:
        raise ValueError(f"could not place {n} droplets without overlap in the volume")
    return droplets
