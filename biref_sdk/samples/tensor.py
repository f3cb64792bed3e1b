"""The dielectric tensor on a voxel grid, voxel-averaged over droplets, and its principal indices.

A tensor field is stored as ``eps6`` float32 [6, Z, Y, X] with components
(xx, yy, zz, xy, xz, yz) — symmetric, so six numbers describe it.
"""
from __future__ import annotations

import torch

from ..files import Volume
from .droplets import Droplet, director_field

COMPONENTS = ("xx", "yy", "zz", "xy", "xz", "yz")
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def uniaxial_eps6(ne, no, director) -> torch.Tensor:
    """eps = no^2 I + (ne^2 - no^2) d d^T for ne, no [...] and director [3, ...] -> [6, ...]."""
    ne, no, d = (torch.as_tensor(a, dtype=torch.float32) for a in (ne, no, director))
    d = d / torch.clamp(torch.linalg.vector_norm(d, dim=0, keepdim=True), min=1e-12)
    delta = ne**2 - no**2
    return torch.stack([no**2 * (i == j) + delta * d[i] * d[j] for i, j in _PAIRS])


def eps6_to_matrix(eps6: torch.Tensor) -> torch.Tensor:
    """[6, ...] -> [..., 3, 3]."""
    xx, yy, zz, xy, xz, yz = eps6
    rows = [torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1), torch.stack([xz, yz, zz], -1)]
    return torch.stack(rows, -2)


def principal_indices(eps6: torch.Tensor, isotropic_tol: float = 1e-9):
    """(ne, no, director) of a tensor field [6, ...]: ne = sqrt(largest eigenvalue), no =
    sqrt(smallest), director = eigenvector of the largest; isotropic voxels get director z^."""
    shape = eps6.shape[1:]
    flat = eps6.reshape(6, -1)
    ne = torch.sqrt(flat[0].clone())
    no = ne.clone()
    director = torch.zeros(3, flat.shape[1], dtype=flat.dtype, device=flat.device)
    director[2] = 1.0
    off = flat[3:].abs().amax(0)
    diag_spread = flat[:3].amax(0) - flat[:3].amin(0)
    anisotropic = (off > isotropic_tol) | (diag_spread > isotropic_tol)
    if anisotropic.any():
        values, vectors = torch.linalg.eigh(eps6_to_matrix(flat[:, anisotropic]).double())
        ne[anisotropic] = torch.sqrt(values[:, 2]).to(flat.dtype)
        no[anisotropic] = torch.sqrt(values[:, 0]).to(flat.dtype)
        director[:, anisotropic] = vectors[:, :, 2].T.to(flat.dtype)
    return ne.reshape(shape), no.reshape(shape), director.reshape(3, *shape)


def voxel_centres_m(volume_shape, voxel_size_m) -> list[torch.Tensor]:
    """Voxel-centre coordinates (z, y, x) in metres, z = 0 at the volume centre."""
    return [(torch.arange(n, dtype=torch.float32) - n / 2) * d for n, d in zip(volume_shape, voxel_size_m)]


def _inside(droplet: Droplet, offsets_m: torch.Tensor) -> torch.Tensor:
    """Whether points at ``offsets_m`` [..., 3] from the centre lie in the droplet (a spheroid)."""
    if droplet.aspect == 1.0:
        return (offsets_m**2).sum(-1) <= droplet.radius_m**2
    axis = torch.as_tensor(droplet.axis, dtype=offsets_m.dtype)
    along = offsets_m @ axis
    across2 = (offsets_m**2).sum(-1) - along**2
    return across2 / droplet.radius_m**2 + (along / (droplet.aspect * droplet.radius_m)) ** 2 <= 1.0


def voxelize_droplets(droplets: list[Droplet], volume_shape, voxel_size_m, medium_index: float,
                      supersample: int = 3, chunk_points: int = 1 << 21) -> torch.Tensor:
    """Voxel-averaged dielectric tensor [6, Z, Y, X] of droplets in a medium.

    Each voxel averages the tensor at ``supersample``^3 points, so voxels cut by a droplet surface
    hold the partial-volume mixture of liquid crystal and medium. Only the droplets' bounding boxes
    are sampled, in slabs of at most about ``chunk_points`` points (bounded memory: a paper-size
    droplet has ~10^8 sub-samples), and the director is evaluated only at points inside a droplet.
    """
    shape = tuple(int(n) for n in volume_shape)
    eps6 = torch.zeros(6, *shape, dtype=torch.float32)
    eps6[:3] = medium_index**2
    centres = voxel_centres_m(shape, voxel_size_m)
    s = supersample
    offsets = (torch.arange(s, dtype=torch.float32) + 0.5) / s - 0.5
    for droplet in droplets:
        c_xyz = droplet.center_m
        lo_hi = []
        for axis, (coords, d, c) in enumerate(zip(centres, voxel_size_m, (c_xyz[2], c_xyz[1], c_xyz[0]))):
            inside = torch.nonzero((coords - c).abs() <= droplet.bounding_radius_m + d).flatten()
            if inside.numel() == 0:
                break
            lo_hi.append((int(inside[0]), int(inside[-1]) + 1))
        if len(lo_hi) < 3:
            continue  # the droplet misses the grid
        (z0, z1), (y0, y1), (x0, x1) = lo_hi
        sub_y, sub_x = [(coords[a:b, None] + offsets[None, :] * d).reshape(-1)
                        for coords, (a, b), d in zip(centres[1:], lo_hi[1:], voxel_size_m[1:])]
        centre = torch.as_tensor(c_xyz, dtype=torch.float32)
        ne, no = torch.tensor(droplet.ne), torch.tensor(droplet.no)
        slab = max(1, chunk_points // (s**3 * (y1 - y0) * (x1 - x0)))
        for za in range(z0, z1, slab):
            zb = min(za + slab, z1)
            sub_z = (centres[0][za:zb, None] + offsets[None, :] * voxel_size_m[0]).reshape(-1)
            zz, yy, xx = torch.meshgrid(sub_z, sub_y, sub_x, indexing="ij")
            points = torch.stack([xx, yy, zz], -1)
            inside = _inside(droplet, points - centre)
            lc = uniaxial_eps6(ne, no, director_field(droplet, points[inside]).T)  # [6, n_inside]
            lc[:3] -= medium_index**2  # contribution relative to the medium
            contrib = torch.zeros(6, *inside.shape, dtype=torch.float32)
            contrib[:, inside] = lc
            contrib = contrib.reshape(6, zb - za, s, y1 - y0, s, x1 - x0, s).mean(dim=(2, 4, 6))
            eps6[:, za:zb, y0:y1, x0:x1] += contrib
    return eps6


def volume_to_eps6(volume: Volume) -> torch.Tensor:
    return uniaxial_eps6(volume.ne, volume.no, volume.director)


def eps6_to_volume(eps6: torch.Tensor, voxel_size_m, medium_index: float, parameters: dict | None = None) -> Volume:
    ne, no, director = principal_indices(eps6)
    return Volume(ne=ne.cpu().numpy(), no=no.cpu().numpy(), director=director.cpu().numpy(),
                  voxel_size_m=voxel_size_m, medium_index=medium_index, parameters=parameters or {})
