"""The formula prior of a network with ``NetworkConfig.prior == "formula"``.

The network reads the prior as seven channels on the volume grid and knows nothing of how they
are made; this module makes them from the formula reconstruction of the same views (the network
package imports nothing from ``reconstruction``: imports run one way).
"""
from __future__ import annotations

import dataclasses

import torch

from ..network.config import NetworkConfig
from ..network.model import q_from_director
from .formula import FormulaOptions, FormulaReconstructor


def with_prior_options(config: NetworkConfig) -> NetworkConfig:
    """``config`` with every :class:`FormulaOptions` field recorded in ``prior_options`` (defaults
    filled in), so that a model file fixes its prior exactly; raises ``ValueError`` for an unknown
    option or a prior other than ``"formula"``."""
    if config.prior != "formula":
        raise ValueError(f"the network's prior is {config.prior!r}, not 'formula'")
    given = config.prior_options or {}
    unknown = set(given) - set(FormulaOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown prior_options {sorted(unknown)}; known: {', '.join(FormulaOptions.__dataclass_fields__)}")
    options = dataclasses.asdict(FormulaOptions(**given))
    if options["index_bounds"] is not None:
        options["index_bounds"] = list(options["index_bounds"])
    return config.replace(prior_options=options)


def formula_reconstructor(config: NetworkConfig, device="cpu") -> FormulaReconstructor:
    """The formula reconstructor that computes ``config``'s prior (``config.prior == "formula"``)."""
    options = with_prior_options(config).prior_options
    return FormulaReconstructor(device=device, **options)  # FormulaOptions takes bounds as a list


def formula_prior(volume, config: NetworkConfig) -> torch.Tensor:
    """A formula reconstruction (a :class:`~biref_sdk.files.Volume`) -> the network's prior
    ``[7, Z, Y, X]``: ``(n_e - index_min) / span``, ``(n_o - index_min) / span`` and the Q-tensor
    components of the director times ``(n_e - n_o) / span``, which is sign-free and fades to zero
    where the formula finds no birefringence (there its director means nothing)."""
    if tuple(volume.shape) != config.volume_shape:
        raise ValueError(f"the prior volume has shape {tuple(volume.shape)}, the network's is {config.volume_shape}")
    span = config.index_max - config.index_min
    ne = torch.as_tensor(volume.ne, dtype=torch.float32)
    no = torch.as_tensor(volume.no, dtype=torch.float32)
    q = q_from_director(torch.as_tensor(volume.director, dtype=torch.float32)) * ((ne - no) / span)
    return torch.cat([((ne - config.index_min) / span)[None], ((no - config.index_min) / span)[None], q])
