"""Closed-form eigen-decomposition of many real symmetric 3x3 matrices (torch, any device).

``torch.linalg.eigh`` on millions of 3x3 matrices is slow on CPU; the trigonometric solution of
the characteristic cubic (Smith 1961) plus a cross-product eigenvector is a few elementwise
passes. Components are in the order (xx, yy, zz, xy, xz, yz), as ``biref_sdk.samples.tensor``.
Everything is written component by component: reductions over a short leading axis
(``vector_norm(dim=...)``, ``argmax``, ``gather``) are an order of magnitude slower on CPU.
"""
from __future__ import annotations

import math

import torch


def _normalized(t6: torch.Tensor):
    """``t6`` divided by each matrix's largest absolute entry (1 for zero matrices), and that
    scale: the cubic's p**3 then neither underflows nor overflows (float32 near the medium)."""
    scale = t6.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return t6 / scale, scale


def _eigenvalues(t6: torch.Tensor, isotropic_tol: float):
    """(largest, middle, smallest, isotropic mask, p) of normalised ``t6`` [6, ...]; ``p`` is the
    RMS deviation of the eigenvalues from their mean (the scale of the anisotropy)."""
    xx, yy, zz, xy, xz, yz = t6
    q = (xx + yy + zz) / 3
    a, b, c = xx - q, yy - q, zz - q
    p = torch.sqrt((a * a + b * b + c * c + 2 * (xy * xy + xz * xz + yz * yz)) / 6)
    isotropic = p <= isotropic_tol
    safe_p = torch.where(isotropic, torch.ones_like(p), p)
    # det((A - qI) / p) / 2 = cos(3 phi)
    det = (a * (b * c - yz * yz) - xy * (xy * c - yz * xz) + xz * (xy * yz - b * xz)) / safe_p**3
    phi = torch.arccos(torch.clamp(det / 2, -1.0, 1.0)) / 3
    largest = torch.where(isotropic, q, q + 2 * p * torch.cos(phi))
    smallest = torch.where(isotropic, q, q + 2 * p * torch.cos(phi + 2 * math.pi / 3))
    middle = 3 * q - largest - smallest
    return largest, middle, smallest, isotropic, p


def _null_vector(t6: torch.Tensor, lam: torch.Tensor):
    """Unit eigenvector [3, ...] of ``lam`` (the best-conditioned cross product of two rows of
    ``A - lam I``) and that cross product's norm (small where ``lam`` is degenerate)."""
    xx, yy, zz, xy, xz, yz = t6
    r0 = (xx - lam, xy, xz)
    r1 = (xy, yy - lam, yz)
    r2 = (xz, yz, zz - lam)

    def cross(u, v):
        return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])

    best = cross(r0, r1)
    best_n2 = best[0] ** 2 + best[1] ** 2 + best[2] ** 2
    for u, v in ((r0, r2), (r1, r2)):
        candidate = cross(u, v)
        n2 = candidate[0] ** 2 + candidate[1] ** 2 + candidate[2] ** 2
        better = n2 > best_n2
        best = tuple(torch.where(better, c, b) for c, b in zip(candidate, best))
        best_n2 = torch.where(better, n2, best_n2)
    norm = torch.sqrt(best_n2)
    inv = 1.0 / torch.clamp(norm, min=torch.finfo(t6.dtype).tiny)
    return torch.stack([c * inv for c in best]), norm


def _default_tol(t6: torch.Tensor, isotropic_tol: float | None) -> float:
    return isotropic_tol if isotropic_tol is not None else (1e-12 if t6.dtype == torch.float64 else 1e-6)


def symmetric_eigen(t6: torch.Tensor, isotropic_tol: float | None = None):
    """(largest, smallest, eigenvector of the largest) of symmetric matrices ``t6`` [6, ...].

    Eigenvalues are exact to rounding; the eigenvector is a unit vector, z^ where the largest
    eigenvalue is (numerically) degenerate or the matrix is isotropic (spread below
    ``isotropic_tol`` times the largest absolute entry; default 1e-12 in float64, 1e-6 in float32).
    """
    unit, scale = _normalized(t6)
    largest, _, smallest, isotropic, p = _eigenvalues(unit, _default_tol(t6, isotropic_tol))
    vector, norm = _null_vector(unit, largest)
    degenerate = isotropic | (norm <= 1e-12 * torch.clamp(p * p, min=torch.finfo(t6.dtype).tiny))
    z_hat = torch.zeros_like(vector)
    z_hat[2] = 1.0
    return largest * scale, smallest * scale, torch.where(degenerate[None], z_hat, vector)


def _any_perpendicular(v: torch.Tensor) -> torch.Tensor:
    """A unit vector perpendicular to unit vectors ``v`` [3, ...]."""
    use_x = v[0].abs() < 0.9  # cross with x^ unless v is close to it, then with y^
    zero = torch.zeros_like(v[0])
    w = torch.stack([torch.where(use_x, zero, -v[2]), torch.where(use_x, v[2], zero),
                     torch.where(use_x, -v[1], v[0])])
    return w / torch.sqrt(w[0] ** 2 + w[1] ** 2 + w[2] ** 2)


def symmetric_eigen_full(t6: torch.Tensor, isotropic_tol: float | None = None):
    """All eigenvalues (ascending, [3, ...]) and an orthonormal eigenvector basis ([3(which),
    3(x, y, z), ...], matching the values) of symmetric matrices ``t6`` [6, ...], in closed form.

    The eigenvector of the better separated extreme eigenvalue is computed first (its cross
    product is the best conditioned); the other extreme one is made perpendicular to it (any
    perpendicular vector where the two remaining eigenvalues are degenerate) and the middle one
    completes the right-handed basis. Isotropic matrices get the identity basis.
    """
    unit, scale = _normalized(t6)
    largest, middle, smallest, isotropic, _ = _eigenvalues(unit, _default_tol(t6, isotropic_tol))
    top_first = (largest - middle) >= (middle - smallest)
    first, _ = _null_vector(unit, torch.where(top_first, largest, smallest))
    second, _ = _null_vector(unit, torch.where(top_first, smallest, largest))
    z_hat = torch.zeros_like(first)
    z_hat[2] = 1.0
    first = torch.where(isotropic[None], z_hat, first)
    second = second - (second * first).sum(0, keepdim=True) * first
    norm = torch.sqrt(second[0] ** 2 + second[1] ** 2 + second[2] ** 2)
    second = torch.where((norm > 1e-6)[None], second / torch.clamp(norm, min=torch.finfo(t6.dtype).tiny),
                         _any_perpendicular(first))
    v_max = torch.where(top_first[None], first, second)
    v_min = torch.where(top_first[None], second, first)
    v_mid = torch.linalg.cross(v_max, v_min, dim=0)
    return torch.stack([smallest, middle, largest]) * scale, torch.stack([v_min, v_mid, v_max])
