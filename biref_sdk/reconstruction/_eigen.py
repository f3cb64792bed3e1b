"""Closed-form eigen-decomposition of many real symmetric 3x3 matrices (torch, any device).

``torch.linalg.eigh`` on millions of 3x3 matrices is slow on CPU; the trigonometric solution of
the characteristic cubic (Smith 1961) plus a cross-product eigenvector is a few elementwise
passes. Components are in the order (xx, yy, zz, xy, xz, yz), as ``biref_sdk.samples.tensor``.
"""
from __future__ import annotations

import math

import torch


def symmetric_eigen(t6: torch.Tensor, isotropic_tol: float = 1e-12):
    """(largest, smallest, eigenvector of the largest) of symmetric matrices ``t6`` [6, ...].

    Eigenvalues are exact to rounding; the eigenvector is a unit vector, z^ where the largest
    eigenvalue is (numerically) degenerate or the matrix is isotropic (spread below
    ``isotropic_tol`` times the largest absolute entry).
    """
    xx, yy, zz, xy, xz, yz = t6
    q = (xx + yy + zz) / 3
    a, b, c = xx - q, yy - q, zz - q
    p1 = xy * xy + xz * xz + yz * yz
    p2 = a * a + b * b + c * c + 2 * p1
    p = torch.sqrt(p2 / 6)
    scale = t6.abs().amax(0)
    isotropic = p <= isotropic_tol * torch.clamp(scale, min=torch.finfo(t6.dtype).tiny)
    safe_p = torch.where(isotropic, torch.ones_like(p), p)
    # det((A - qI) / p) / 2 = cos(3 phi)
    det = (a * (b * c - yz * yz) - xy * (xy * c - yz * xz) + xz * (xy * yz - b * xz)) / safe_p**3
    r = torch.clamp(det / 2, -1.0, 1.0)
    phi = torch.arccos(r) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)

    # eigenvector of the largest: the null space of A - largest*I is along the cross product of
    # two of its rows; the pair with the largest cross product is the best conditioned
    lam = largest
    r0 = torch.stack([xx - lam, xy, xz])
    r1 = torch.stack([xy, yy - lam, yz])
    r2 = torch.stack([xz, yz, zz - lam])
    crosses = torch.stack([torch.linalg.cross(r0, r1, dim=0), torch.linalg.cross(r0, r2, dim=0),
                           torch.linalg.cross(r1, r2, dim=0)])  # [3, 3, ...]
    norms = torch.linalg.vector_norm(crosses, dim=1)  # [3, ...]
    best = norms.argmax(0, keepdim=True)  # [1, ...]
    vector = torch.gather(crosses, 0, best[:, None].expand(1, 3, *best.shape[1:]))[0]
    norm = torch.gather(norms, 0, best)[0]
    degenerate = isotropic | (norm <= 1e-12 * torch.clamp(p * p, min=torch.finfo(t6.dtype).tiny))
    vector = vector / torch.clamp(norm, min=torch.finfo(t6.dtype).tiny)
    z_hat = torch.zeros_like(vector)
    z_hat[2] = 1.0
    vector = torch.where(degenerate[None], z_hat, vector)
    largest = torch.where(isotropic, q, largest)
    smallest = torch.where(isotropic, q, smallest)
    return largest, smallest, vector
