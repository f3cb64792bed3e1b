"""The trained network behind the common :class:`Reconstructor` interface.

A session preprocesses each view as it arrives and adds it into its window's mean; when a window
has all its views (both polarizations) it is encoded, and the 3D ConvGRU steps through every
encoded window that is next in sequence order. ``finalize`` is then the last steps, attention and
the decoder. The result equals the network's whole forward pass on the complete acquisition.

A network with the formula prior (``NetworkConfig.prior``) also feeds every view to a formula
session as it arrives; ``finalize`` finishes that session first and passes its volume to the
decoder.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from .base import ReconstructionSession, Reconstructor


class ModelSession(ReconstructionSession):
    def __init__(self, reconstructor: "ModelReconstructor", geometry: Geometry, background: np.ndarray) -> None:
        from ..network.io import check_geometry
        from ..network.preprocess import InputPreprocessor

        super().__init__(geometry)
        model = reconstructor.model
        check_geometry(model.geometry, geometry)
        self._model = model
        self._device = reconstructor.device
        config = model.config
        self._config = config
        self._preprocessor = InputPreprocessor(config, geometry, background)
        c = config.channels_per_polarization
        self._sums = torch.zeros(config.sequence_length, 2, c, *config.input_shape)
        self._counts = np.zeros((config.sequence_length, 2), dtype=int)
        self._features: list[torch.Tensor | None] = [None] * config.sequence_length
        self._states: list[torch.Tensor] = []
        self._hidden = model.network.initial_hidden(1, self._device)
        self._prior_session = None
        if config.prior != "none":
            self._prior_session = reconstructor.prior_reconstructor().start(geometry, background)

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        if self._prior_session is not None:  # the formula uses every view, also those past the last window
            self._prior_session.add_view(polarization, view, hologram)
        window = view // self._config.window_length
        if window >= self._config.sequence_length:
            return  # a view beyond the last whole window: the network does not use it
        self._sums[window, polarization] += self._preprocessor.view(polarization, view, hologram)
        self._counts[window, polarization] += 1
        if self._counts[window].min() == self._config.window_length:
            self._encode(window)
            self._advance()

    @torch.no_grad()
    def _encode(self, window: int) -> None:
        counts = torch.as_tensor(np.maximum(self._counts[window], 1), dtype=torch.float32)
        mean = self._sums[window] / counts[:, None, None, None]  # [2, c, H', W']
        x = mean.reshape(1, -1, 1, *self._config.input_shape).to(self._device)
        self._features[window] = self._model.network.encode(x)
        self._sums[window] = 0  # no longer needed

    @torch.no_grad()
    def _advance(self) -> None:
        while len(self._states) < self._config.sequence_length and self._features[len(self._states)] is not None:
            step = len(self._states)
            self._hidden = self._model.network.gru_step(self._hidden, self._features[step])
            self._features[step] = None
            self._states.append(self._hidden)

    def missing_views(self) -> int:
        """Views the network uses that have not arrived."""
        used = self._config.sequence_length * self._config.window_length
        return int((~self.received[:, :used]).sum())

    @torch.no_grad()
    def finalize(self, allow_missing: bool = False) -> Volume:
        from ..network.model import director_from_q

        missing = self.missing_views()
        if missing and not allow_missing:
            raise ValueError(f"{missing} views are missing; pass allow_missing=True to reconstruct without them")
        for window in range(self._config.sequence_length):
            if len(self._states) <= window and self._features[window] is None:
                # with views missing: the mean of those present (zero, i.e. no sample signal, if none)
                self._encode(window)
        self._advance()
        prior = None
        if self._prior_session is not None:
            from ..network.preprocess import formula_prior

            prior = formula_prior(self._prior_session.finalize(allow_missing=allow_missing), self._config)
            prior = prior[None].to(self._device)
        ne, no, q = self._model.network.finalize(torch.stack(self._states, dim=1), prior)
        director = director_from_q(q[0].cpu())
        parameters = {"method": "model", "model_sha256": self._model.sha256,
                      "model_file": os.path.basename(self._model.path or ""), "missing_views": missing,
                      "window_length": self._config.window_length, "sequence_length": self._config.sequence_length,
                      "prior": self._config.prior}
        return Volume(ne=ne[0].cpu().numpy(), no=no[0].cpu().numpy(), director=director.numpy(),
                      voxel_size_m=self.geometry.voxel_size_m, medium_index=self.geometry.medium_index,
                      parameters=parameters)


class ModelReconstructor(Reconstructor):
    """The paper's network from a model file (checksum verified; nothing is downloaded).

    ``model``: a path to a model file or a :class:`~biref_sdk.network.io.LoadedModel`.
    """

    name = "model"

    def __init__(self, model=None, device: str = "cpu", threads: int | None = None) -> None:
        """``model``: a model file, a loaded model, or None for the shipped ``small`` model."""
        from ..network.io import LoadedModel, load_model, shipped_model_path

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        if model is None:
            model = shipped_model_path()
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=self.device)
        self.model.network.to(self.device).eval()
        self._prior_reconstructor = None

    def prior_reconstructor(self):
        """The formula reconstructor of the model's prior, built once (it caches per-geometry tables)."""
        from ..network.preprocess import formula_reconstructor

        if self._prior_reconstructor is None:
            self._prior_reconstructor = formula_reconstructor(self.model.config, device=self.device)
        return self._prior_reconstructor

    def start(self, geometry: Geometry, background: np.ndarray) -> ModelSession:
        return ModelSession(self, geometry, background)
