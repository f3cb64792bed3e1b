"""Samples to image: liquid-crystal droplets in a medium, or any user volume."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from .droplets import (CONFIGURATIONS, DISTRIBUTIONS, Droplet, DropletDistribution, director_field,
                       distribution_names, draw_distribution, random_droplets)
from .tensor import eps6_to_volume, principal_indices, uniaxial_eps6, volume_to_eps6, voxelize_droplets

__all__ = ["CONFIGURATIONS", "DISTRIBUTIONS", "Droplet", "DropletDistribution", "distribution_names", "Sample", "director_field", "droplet_sample",
           "eps6_to_volume", "principal_indices", "random_sample", "sphere_sample", "uniaxial_eps6",
           "uniform_sample", "volume_sample", "volume_to_eps6", "voxelize_droplets"]


@dataclass
class Sample:
    """What the simulator images: the voxel dielectric tensor ``eps6`` [6, Z, Y, X] on the grid
    ``voxel_size_m``, and its truth (principal indices and director of that same tensor)."""

    eps6: torch.Tensor
    voxel_size_m: tuple[float, float, float]
    medium_index: float
    description: dict

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return tuple(self.eps6.shape[1:])

    def truth(self) -> Volume:
        return eps6_to_volume(self.eps6, self.voxel_size_m, self.medium_index, self.description)


def droplet_sample(droplets: list[Droplet], geometry: Geometry, supersample: int = 3) -> Sample:
    eps6 = voxelize_droplets(droplets, geometry.volume_shape, geometry.voxel_size_m, geometry.medium_index, supersample)
    description = {"droplets": [vars(d) if not hasattr(d, "__dataclass_fields__") else
                                {k: getattr(d, k) for k in d.__dataclass_fields__} for d in droplets]}
    return Sample(eps6, geometry.voxel_size_m, geometry.medium_index, description)


def random_sample(rng: np.random.Generator, geometry: Geometry,
                  distribution: DropletDistribution | str = DropletDistribution(), supersample: int = 3) -> Sample:
    """A random sample of a distribution, or of a named one (``DISTRIBUTIONS`` or "broad", the
    training mixture; the description then names the sample's category)."""
    category = None
    if isinstance(distribution, str):
        category, distribution = draw_distribution(rng, distribution)
    extent = np.asarray(geometry.volume_shape) * np.asarray(geometry.voxel_size_m)
    sample = droplet_sample(random_droplets(rng, extent, geometry.medium_index, distribution), geometry, supersample)
    if category is not None:
        sample.description["category"] = category
    return sample


def sphere_sample(geometry: Geometry, radius_m: float, index: float, center_m=(0.0, 0.0, 0.0),
                  supersample: int = 3) -> Sample:
    """A uniform isotropic sphere of refractive index ``index``."""
    sphere = Droplet(center_m=tuple(center_m), radius_m=radius_m, axis=(0, 0, 1), configuration="uniform",
                     ne=index, no=index)
    return droplet_sample([sphere], geometry, supersample)


def uniform_sample(geometry: Geometry, ne: float, no: float, director=(1.0, 0.0, 0.0)) -> Sample:
    """The whole volume filled with one uniaxial material (a slab as thick as the volume)."""
    shape = geometry.volume_shape
    d = torch.as_tensor(director, dtype=torch.float32).reshape(3, 1, 1, 1).expand(3, *shape)
    eps6 = uniaxial_eps6(torch.full(shape, ne), torch.full(shape, no), d).contiguous()
    return Sample(eps6, geometry.voxel_size_m, geometry.medium_index,
                  {"uniform": {"ne": ne, "no": no, "director": list(director)}})


def volume_sample(volume: Volume) -> Sample:
    """A user's volume file as a sample (its own grid and medium)."""
    return Sample(volume_to_eps6(volume), volume.voxel_size_m, volume.medium_index, {"volume": volume.parameters})
