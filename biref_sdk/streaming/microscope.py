"""A simulated microscope that streams simulated acquisitions to the service (``biref microscope-sim``).

It images random liquid-crystal droplet samples with :class:`biref_sdk.simulate.Simulator` and
sends each acquisition as a real instrument would: ``start`` (with the background), the 2*V views
at a chosen rate, ``stop``. Acquisition ``i`` depends only on (``seed``, ``i``), so a test can
regenerate exactly what was streamed and reconstruct it offline.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..files import Acquisition
from ..geometry import Geometry, preset


class SimulatedMicroscope:
    """``geometry``: a preset name or a :class:`Geometry`; further keywords go to ``Simulator``."""

    def __init__(self, geometry: str | Geometry = "small", seed: int = 0, id_prefix: str = "sim", **simulator_options) -> None:
        from ..simulate import Simulator

        self.geometry = preset(geometry) if isinstance(geometry, str) else geometry
        self.seed = int(seed)
        self.id_prefix = id_prefix
        self.simulator = Simulator(self.geometry, **simulator_options)
        self._background: np.ndarray | None = None

    def acquisition_id(self, index: int) -> str:
        return f"{self.id_prefix}-{self.seed}-{index}"

    def acquisition(self, index: int) -> Acquisition:
        """Acquisition ``index``: its own random sample and camera noise; one background (as an
        instrument records it once per session) shared by all."""
        if self._background is None:
            self._background = self.simulator.background(self.seed)
        sequence = np.random.SeedSequence([self.seed, int(index)])
        sample_seed, noise_seed = sequence.generate_state(2)
        sample = self.simulator.random_sample(np.random.default_rng(int(sample_seed)))
        return self.simulator.acquire(sample, seed=int(noise_seed), background=self._background)

    def acquisitions(self, n: int, first: int = 0) -> Iterator[tuple[str, Acquisition]]:
        for index in range(first, first + n):
            yield self.acquisition_id(index), self.acquisition(index)

    def stream(self, producer, n: int, rate_views_per_s: float | None = None, background: str = "inline",
               first: int = 0, on_sent=None) -> list[dict]:
        """Simulate and send ``n`` acquisitions through ``producer`` (a :class:`Producer`); returns
        each one's send timings. ``on_sent(timing)`` is called after each."""
        timings = []
        for acquisition_id, acquisition in self.acquisitions(n, first):
            timing = producer.send_acquisition(acquisition, acquisition_id, rate_views_per_s=rate_views_per_s,
                                               background=background)
            timings.append(timing)
            if on_sent is not None:
                on_sent(timing)
        return timings
