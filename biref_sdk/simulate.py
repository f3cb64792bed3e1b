"""The simulated DTT microscope: a sample in, the acquisition a real instrument would record out."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ._version import __version__
from .files import Acquisition, DatasetWriter, Volume
from .geometry import Geometry
from .holography import CameraConfig, expose, intensity
from .physics import MultiSlice
from .samples import DropletDistribution, Sample, random_sample, volume_sample


@dataclass(frozen=True)
class SimulationConfig:
    """Simulator settings; ``camera`` and ``droplets`` are their own sections."""

    supersample: int = 3      # sub-samples per voxel edge for the partial-volume tensor average
    substeps: int = 1         # thin screens per voxel slice
    vector_scattering: bool = True  # high-NA vector Born correction (False: the plain Jones multi-slice)
    camera: CameraConfig = field(default_factory=CameraConfig)
    # the random samples' distribution, or the name of one (samples.DISTRIBUTIONS, or "broad")
    droplets: DropletDistribution | str = field(default_factory=DropletDistribution)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.droplets, str):  # a name: record what it meant
            from .samples.droplets import BROAD_MIXTURE, DISTRIBUTIONS
            names = [n for _, n in BROAD_MIXTURE] if self.droplets == "broad" else [self.droplets]
            out["distributions"] = {n: dataclasses.asdict(DISTRIBUTIONS[n]) for n in names}
            if self.droplets == "broad":
                out["mixture"] = [list(pair) for pair in BROAD_MIXTURE]
        return out


def _seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), *map(int, keys)])


class Simulator:
    """Images samples with the geometry's microscope.

    ``fields`` gives the noise-free focal-plane fields, ``acquire`` the camera frames of a sample and
    of the empty field of view (the background), as an :class:`Acquisition` with the truth attached.
    """

    def __init__(self, geometry: Geometry, config: SimulationConfig = SimulationConfig(), device="cpu") -> None:
        self.geometry = geometry
        self.config = config
        self.device = torch.device(device)
        self._optics = MultiSlice(geometry, device=self.device, substeps=config.substeps,
                                  vector=config.vector_scattering)

    def _as_sample(self, sample) -> Sample:
        if isinstance(sample, Volume):
            sample = volume_sample(sample)
        if not isinstance(sample, Sample):
            raise TypeError(f"expected a Sample or a Volume, got {type(sample).__name__}")
        if not np.isclose(sample.medium_index, self.geometry.medium_index, atol=1e-6):
            raise ValueError(f"sample medium index {sample.medium_index} != microscope's {self.geometry.medium_index}")
        return sample

    def geometry_for(self, sample) -> Geometry:
        """The microscope geometry with the sample's own volume grid (a user volume may differ)."""
        sample = self._as_sample(sample)
        return self.geometry.replace(volume_shape=sample.volume_shape, voxel_size_m=sample.voxel_size_m)

    def random_sample(self, rng: np.random.Generator) -> Sample:
        return random_sample(rng, self.geometry, self.config.droplets, self.config.supersample)

    def fields(self, sample) -> torch.Tensor:
        """Noise-free focal-plane fields complex64[2(pol), V, 2(x, y), H, W]."""
        sample = self._as_sample(sample)
        self.geometry_for(sample)  # validates that the sample fits the field of view
        return self._optics.transmit(sample.eps6, sample.voxel_size_m)

    def background_fields(self) -> torch.Tensor:
        return self._optics.illumination()

    def _frames(self, fields: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        camera = self.config.camera
        return expose(intensity(fields, self.geometry, camera.reference_amplitude), camera, generator)

    def background(self, seed: int = 0) -> np.ndarray:
        """Background frames uint16[2, V, H, W] (the empty field of view, its own camera noise)."""
        generator = torch.Generator(device=self.device).manual_seed(int(_seed_sequence(seed, 1).generate_state(1)[0]))
        return self._frames(self.background_fields(), generator)

    def frames(self, sample, seed: int = 0) -> np.ndarray:
        """Sample frames uint16[2, V, H, W]."""
        generator = torch.Generator(device=self.device).manual_seed(int(_seed_sequence(seed, 2).generate_state(1)[0]))
        return self._frames(self.fields(sample), generator)

    def acquire(self, sample, seed: int = 0, background: np.ndarray | None = None) -> Acquisition:
        sample = self._as_sample(sample)
        start = time.perf_counter()
        holograms = self.frames(sample, seed)
        if background is None:
            background = self.background(seed)
        parameters = {"simulator": self.config.to_dict(), "seed": seed, "sample": sample.description,
                      "seconds": time.perf_counter() - start, "device": str(self.device)}
        return Acquisition(holograms=holograms, background=background, geometry=self.geometry_for(sample),
                           truth=sample.truth(), parameters=parameters)


def simulate_dataset(path, geometry: Geometry, n: int, seed: int = 0, config: SimulationConfig = SimulationConfig(),
                     device="cpu", progress: bool = True) -> None:
    """Write a data set file of ``n`` random droplet samples. Sample ``i`` depends only on
    (``seed``, ``i``), so any sample can be regenerated alone."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError("n must be >= 1")
    simulator = Simulator(geometry, config, device)
    parameters = {"simulator": config.to_dict(), "seed": seed, "n": n, "sdk_version": __version__,
                  "generator": "biref_sdk.simulate.simulate_dataset"}
    with DatasetWriter(path, geometry, n, simulator.background(seed), parameters) as writer:
        for index in tqdm(range(n), desc="simulating", unit="sample", disable=not progress):
            rng = np.random.default_rng(_seed_sequence(seed, 3, index))
            sample = simulator.random_sample(rng)
            writer.write(index, simulator.frames(sample, seed=int(_seed_sequence(seed, 4, index).generate_state(1)[0])), sample.truth())
