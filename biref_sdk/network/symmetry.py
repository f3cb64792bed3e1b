"""Quarter turns about the optical axis: an exact symmetry of the DTT acquisition.

Turning the sample by +90 degrees about z (x^ -> y^) and turning the illumination ring with it
gives the acquisition of the turned sample: its view k is the original view whose illumination
sine, turned, is view k's (the ring of 36 views at 10 degree steps maps onto itself, so every
view has a source), with the input polarizations exchanged (x^ -> y^, y^ -> -x^, so the
co-polarized component of one becomes that of the other and the cross-polarized one changes
sign) and the image turned about the optical axis. The truth and the formula prior turn with the
sample: scalar volumes are turned, Q-tensors are turned as R Q R^T.

The turn maps the grid onto itself about index N/2 (coordinate 0 of the volume and of the field,
:func:`biref_sdk.samples.voxel_centres_m`): index i -> (N - i) mod N, so no interpolation is needed.
The windows of the turned acquisition mix views of different original windows, so a turn acts
on the per-view inputs, before the window mean.

Training uses it to augment (``biref train --augment quarter-turns``), the model reconstructor
to average the network's answers over the four turns (``quarter_turns=True``).
``tests/test_quarter_turns.py`` checks it against the simulator: the turned inputs of a sample
are the inputs of the turned sample.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import Geometry
from .model import Q_BASIS

# per input polarization the field channels are Re u_x, Re u_y, Im u_x, Im u_y
# (network.preprocess.InputPreprocessor); a quarter turn maps polarization p' <- p with these signs
_CHANNEL_SOURCE = (  # (new polarization, its channel) <- (old polarization, channel, sign)
    ((1, 1, 1.0), (1, 0, -1.0), (1, 3, 1.0), (1, 2, -1.0)),   # new x^ input <- old y^ input
    ((0, 1, -1.0), (0, 0, 1.0), (0, 3, -1.0), (0, 2, 1.0)),   # new y^ input <- old x^ input
)
_TURN = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # +90 degrees about z


def quarter_turn_sources(geometry: Geometry, tolerance: float = 1e-6) -> np.ndarray:
    """``source[k]``: the original view whose illumination, turned by +90 degrees, is view ``k``'s.

    Raises ``ValueError`` when the illumination pattern is not symmetric under a quarter turn.
    """
    sines = geometry.sines  # [V, 2] (s_x, s_y)
    turned = sines @ _TURN[:2, :2].T
    distance = np.linalg.norm(turned[None, :, :] - sines[:, None, :], axis=-1)  # [k, j]
    source = distance.argmin(axis=1)
    if distance[np.arange(len(sines)), source].max() > tolerance or len(set(source)) != len(source):
        raise ValueError("the illumination pattern does not map onto itself under a quarter turn about z; "
                         "quarter-turn augmentation needs a symmetric pattern")
    return source


def turn_image(x: torch.Tensor, turns: int = 1) -> torch.Tensor:
    """``[..., N, N]`` turned by ``turns`` x +90 degrees about index N/2 (one turn:
    new[a, b] = old[(N - b) % N, a]), in one gather whatever the number of turns."""
    n = x.shape[-1]
    if x.shape[-2] != n:
        raise ValueError(f"a quarter turn needs a square grid, got {tuple(x.shape[-2:])}")
    index = (n - torch.arange(n, device=x.device)) % n
    turns = int(turns) % 4
    # whole rows gathered, then transposed: indexing the last axis of a transposed view is ~10x slower
    if turns == 1:
        return x.index_select(-2, index).transpose(-2, -1)
    if turns == 2:  # new[a, b] = old[(N - a) % N, (N - b) % N]
        return x.index_select(-2, index).index_select(-1, index)
    if turns == 3:  # new[a, b] = old[b, (N - a) % N]
        return x.index_select(-1, index).transpose(-2, -1)
    return x


def _q_turn_matrix() -> torch.Tensor:
    """The 5 x 5 map of Q components (in Q_BASIS, orthonormal) under Q -> R Q R^T."""
    r = torch.as_tensor(_TURN, dtype=torch.float64)
    turned = torch.einsum("ai,lij,bj->lab", r, Q_BASIS, r)  # R B_l R^T
    return torch.einsum("kab,lab->kl", Q_BASIS, turned)


_Q_TURN = _q_turn_matrix()


def turn_q(q: torch.Tensor, turns: int = 1) -> torch.Tensor:
    """Q components ``[..., 5, Z, Y, X]`` of a sample turned ``turns`` times: spatially, and R Q R^T."""
    turns = int(turns) % 4
    if turns == 0:
        return q
    matrix = torch.linalg.matrix_power(_Q_TURN, turns).to(q.dtype)
    return turn_image(torch.einsum("kl,...lzyx->...kzyx", matrix, q), turns)


def turn_prior(prior: torch.Tensor) -> torch.Tensor:
    """A formula prior ``[7, Z, Y, X]`` (network.preprocess.formula_prior) of a turned sample."""
    return torch.cat([turn_image(prior[:2]), turn_q(prior[2:])])


def turn_inputs(x: torch.Tensor) -> torch.Tensor:
    """Field inputs ``[..., 2 * 4, H, W]`` (both polarizations stacked) of one illumination -> those
    of the turned sample under the turned illumination (polarizations exchanged, image turned)."""
    if x.shape[-3] != 8:
        raise ValueError(f"expected field inputs [..., 8, H, W] (input_mode 'field'), got {tuple(x.shape)}")
    channels = [sign * x[..., 4 * p + ch, :, :] for new in _CHANNEL_SOURCE for p, ch, sign in new]
    return turn_image(torch.stack(channels, dim=-3))


def turn_views(views: torch.Tensor, sources: np.ndarray) -> torch.Tensor:
    """Per-view inputs ``[V, 8, H, W]`` -> those of the turned sample (views reordered by ``sources``)."""
    if views.shape[0] != len(sources):
        raise ValueError(f"expected per-view inputs of {len(sources)} views, got {tuple(views.shape)}")
    return turn_inputs(views[torch.as_tensor(sources)])


def turn_output(ne: torch.Tensor, no: torch.Tensor, q: torch.Tensor, turns: int):
    """Network outputs ``ne``, ``no`` ``[..., Z, Y, X]``, ``q`` ``[..., 5, Z, Y, X]`` turned by ``turns``."""
    return turn_image(ne, turns), turn_image(no, turns), turn_q(q, turns)


class QuarterTurns:
    """Turns a training item (per-view inputs, truth, prior) by ``turns`` quarter turns."""

    def __init__(self, geometry: Geometry) -> None:
        self.sources = quarter_turn_sources(geometry)

    def __call__(self, views: torch.Tensor, item: dict[str, torch.Tensor], turns: int):
        item = dict(item)
        for _ in range(int(turns) % 4):
            views = turn_views(views, self.sources)
            item["ne"], item["no"], item["q"] = turn_output(item["ne"], item["no"], item["q"], 1)
            if "prior" in item:
                item["prior"] = turn_prior(item["prior"])
        return views, item
