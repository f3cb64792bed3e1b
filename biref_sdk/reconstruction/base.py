"""One interface for every reconstruction (formula, network on any engine): an acquisition in, a
Volume out, either at once or incrementally as views arrive (the streaming runtime's path)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from ..files import Acquisition, Volume
from ..geometry import Geometry


class ReconstructionSession(ABC):
    """State of one acquisition being reconstructed incrementally.

    Views may arrive in any order; each ``add_view`` does the work that view allows at once, so that
    ``finalize`` after the last view has little left to do.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.received = np.zeros((2, geometry.n_views), dtype=bool)

    def add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        if polarization not in (0, 1):
            raise ValueError(f"polarization must be 0 or 1, got {polarization}")
        if not 0 <= view < self.geometry.n_views:
            raise ValueError(f"view {view} outside 0..{self.geometry.n_views - 1}")
        if tuple(np.shape(hologram)) != self.geometry.hologram_shape:
            raise ValueError(f"hologram shape {np.shape(hologram)} != {self.geometry.hologram_shape}")
        if self.received[polarization, view]:
            raise ValueError(f"duplicate view: polarization {polarization}, view {view}")
        self._add_view(polarization, view, hologram)
        self.received[polarization, view] = True

    @property
    def complete(self) -> bool:
        return bool(self.received.all())

    @abstractmethod
    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        ...

    @abstractmethod
    def finalize(self, allow_missing: bool = False) -> Volume:
        """The volume from the views received. Raises ValueError if views are missing, unless
        ``allow_missing`` (then the result uses the views present and says so in ``parameters``)."""


class Reconstructor(ABC):
    """A reconstruction method. ``reconstruct`` is the whole-acquisition call; ``start`` opens an
    incremental session for one acquisition (several may be open at once)."""

    name: str = "abstract"

    @abstractmethod
    def start(self, geometry: Geometry, background: np.ndarray) -> ReconstructionSession:
        """``background`` [2, V, H, W]: the no-sample frames of this acquisition."""

    def session_bytes(self, geometry: Geometry) -> int:
        """Bytes one session may hold (the streaming service's admission): an estimate of two
        float32 copies of the frames plus 64 bytes per voxel, unless a method knows better."""
        frames = 2 * geometry.n_views * math.prod(geometry.hologram_shape)
        return 2 * frames * 4 + 64 * math.prod(geometry.volume_shape)

    def reconstruct(self, acquisition: Acquisition) -> Volume:
        session = self.start(acquisition.geometry, acquisition.background)
        for p in range(2):
            for v in range(acquisition.geometry.n_views):
                session.add_view(p, v, acquisition.holograms[p, v])
        return session.finalize()
