"""A PyTorch Dataset over a data set file (docs/formats.md): network inputs and training targets."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..files import Dataset
from ..network.config import NetworkConfig
from ..network.model import q_from_director
from ..network.preprocess import InputPreprocessor
from ..reconstruction.prior import formula_prior, formula_reconstructor
from ..network.symmetry import QuarterTurns

# voxels whose n_e - n_o is below this are isotropic: their director carries no information
ISOTROPIC_BIREFRINGENCE = 1e-5


def training_targets(ne: np.ndarray, no: np.ndarray, director: np.ndarray) -> dict[str, torch.Tensor]:
    """Truth volumes -> ``ne``, ``no`` [Z, Y, X] and ``q`` [5, Z, Y, X]: the Q-tensor components of
    d dᵀ - I/3 inside birefringent voxels, zero in isotropic ones (where no director exists)."""
    ne_t = torch.as_tensor(np.asarray(ne, dtype=np.float32))
    no_t = torch.as_tensor(np.asarray(no, dtype=np.float32))
    anisotropic = (ne_t - no_t) > ISOTROPIC_BIREFRINGENCE
    q = q_from_director(torch.as_tensor(np.asarray(director, dtype=np.float32))) * anisotropic
    return {"ne": ne_t, "no": no_t, "q": q}


class HologramDataset(torch.utils.data.Dataset):
    """Sample ``i`` of a data set file as ``{"windows": [S, C_in, 1, H', W'], "ne", "no", "q"}``,
    plus ``"prior"`` ``[7, Z, Y, X]`` for a network with a formula prior.

    The preprocessed inputs (demodulation is the costly part) and priors (a formula
    reconstruction each) are cached as float16 after the first epoch when ``cache`` is set; truths
    are read from the file each time. Without ``cache_dir`` the cache is in memory (2.4 MB per
    sample and process with ``augment``); with it, on disk in that folder, shared by the processes
    of a ``torchrun`` and by later runs, and not also in memory (the operating system's page cache
    holds it once for all processes), so memory stays bounded whatever the data set's size. Its
    subfolders are keyed by the data file (path, size, modification time) and by what the cached
    values depend on (the prior's options; the input preprocessing).

    ``augment``: each item is turned by a random number of quarter turns about the optical axis
    (:mod:`biref_sdk.network.symmetry`, an exact symmetry of the acquisition): inputs, truth and
    prior. The turn acts on the per-view inputs, so those are cached instead of the windows (three
    times the memory).
    """

    def __init__(self, path, config: NetworkConfig, cache: bool = True, limit: int | None = None,
                 cache_dir=None, augment: bool = False) -> None:
        self.file = Dataset(path)
        self.config = config
        self.geometry = self.file.geometry
        self._preprocessor: InputPreprocessor | None = None
        self.length = len(self.file) if limit is None else min(int(limit), len(self.file))
        if self.length < 1:
            raise ValueError(f"{path}: no samples to use")
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}
        self._priors: dict[int, torch.Tensor] = {}
        self._formula = None
        self.turns = QuarterTurns(self.geometry) if augment else None
        self.prior_folder = None
        self.input_folder = None
        if cache_dir is not None:
            stat = os.stat(path)
            source = [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]
            if config.prior != "none":
                self.prior_folder = _keyed_folder(cache_dir, path, [*source, config.prior, config.prior_options,
                                                                    config.volume_shape, config.index_min,
                                                                    config.index_max])
            self.input_folder = _keyed_folder(cache_dir, path, [*source, "inputs", augment, config.input_mode,
                                                                config.field_downsample, config.window_length,
                                                                config.sequence_length])

    def __len__(self) -> int:
        return self.length

    @property
    def preprocessor(self) -> InputPreprocessor:
        if self._preprocessor is None:  # built lazily, so the dataset pickles cheaply into workers
            self._preprocessor = InputPreprocessor(self.config, self.geometry, self.file.background)
        return self._preprocessor

    def _inputs(self, index: int) -> torch.Tensor:
        """The windows ``[S, C_in, 1, H', W']``, or with ``augment`` the per-view inputs ``[V, C_in, H', W']``."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached.to(torch.float32)
        stored = None if self.input_folder is None else self.input_folder / f"{index:06d}.pt"
        if stored is not None and stored.is_file():
            return torch.load(stored, weights_only=True).to(torch.float32)
        holograms = self.file.holograms(index)
        inputs = self.preprocessor.per_view(holograms) if self.turns is not None else self.preprocessor.acquisition(holograms)
        if stored is not None:
            inputs = inputs.to(torch.float16)
            _save_atomically(inputs, stored)
            return inputs.to(torch.float32)
        if self.cache:
            # the first epoch sees the same float16-rounded inputs as the later ones (and a
            # resumed run, whose cache starts empty, the same as an uninterrupted one)
            self._cache[index] = inputs.to(torch.float16)
            return self._cache[index].to(torch.float32)
        return inputs

    def windows(self, index: int) -> torch.Tensor:
        """Sample ``index``'s window sequence ``[S, C_in, 1, H', W']`` as recorded (never turned)."""
        inputs = self._inputs(index)
        return self.preprocessor.window_mean(inputs) if self.turns is not None else inputs

    def prior(self, index: int) -> torch.Tensor:
        cached = self._priors.get(index)
        if cached is not None:
            return cached.to(torch.float32)
        stored = None if self.prior_folder is None else self.prior_folder / f"{index:06d}.pt"
        if stored is not None and stored.is_file():
            prior = torch.load(stored, weights_only=True)
        else:
            if self._formula is None:
                self._formula = formula_reconstructor(self.config)
            prior = formula_prior(self._formula.reconstruct(self.file.acquisition(index)), self.config)
            prior = prior.to(torch.float16)  # the precision of the in-memory cache, on disk too
            if stored is not None:
                _save_atomically(prior, stored)
        if self.cache and stored is None:
            self._priors[index] = prior
        return prior.to(torch.float32)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        truth = self.file.truth(index)
        item = training_targets(truth.ne, truth.no, truth.director)
        if self.config.prior != "none":
            item["prior"] = self.prior(index)
        if self.turns is None:
            item["windows"] = self.windows(index)
        else:
            turns = int(torch.randint(4, ()))  # the global generator: seeded per rank, checkpointed
            views, item = self.turns(self._inputs(index), item, turns)
            item["windows"] = self.preprocessor.window_mean(views)
        item["index"] = torch.tensor(index)
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_preprocessor"] = None
        state["_formula"] = None
        return state


def _keyed_folder(cache_dir, path, key: list) -> Path:
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).stem}-{digest}"  # made by the first value saved in it


def _save_atomically(tensor: torch.Tensor, stored: Path) -> None:
    stored.parent.mkdir(parents=True, exist_ok=True)
    temporary = stored.with_suffix(f".{os.getpid()}.tmp")
    torch.save(tensor, temporary)
    os.replace(temporary, stored)  # a concurrent reader sees all or nothing
