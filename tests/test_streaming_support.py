"""Shared helpers of the streaming tests (no tests here): small real engines that make the service's
routing observable, tiny geometries, and hang-proof waiting.

``ViewMeanReconstructor`` is a real (if trivial) reconstruction: voxel ``p*V + v`` of ``ne`` holds the
mean of view (p, v) minus the mean of its background, so a test can tell that every frame reached
the right slot, exactly once, and from the right acquisition.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from biref_sdk.files import Acquisition, Volume
from biref_sdk.geometry import preset
from biref_sdk.reconstruction.base import ReconstructionSession, Reconstructor

DEADLINE_S = 20.0   # upper bound for any single wait in these tests; normal runs take milliseconds


def wire(message_frames) -> list[bytes]:
    """What a receiver sees of an encoded message: every frame as bytes."""
    return [bytes(memoryview(f)) for f in message_frames]


def tiny_geometry(n_views: int = 3, side: int = 32, volume_shape=(4, 8, 8)):
    base = preset("small")
    return base.replace(illumination_sines=base.sines[:n_views], hologram_shape=(side, side), volume_shape=volume_shape)


def random_acquisition(geometry, seed: int = 0, dtype=np.uint16) -> Acquisition:
    rng = np.random.default_rng(seed)
    shape = (2, geometry.n_views, *geometry.hologram_shape)
    return Acquisition(rng.integers(0, 4000, shape).astype(dtype), rng.integers(0, 50, shape).astype(dtype), geometry)


def expected_view_means(acquisition: Acquisition, present=None) -> np.ndarray:
    """What ViewMeanReconstructor yields in its first 2*V voxels (NaN where a view is missing)."""
    h = acquisition.holograms.astype(np.float64).mean(axis=(2, 3))
    b = acquisition.background.astype(np.float64).mean(axis=(2, 3))
    out = (h - b).ravel().astype(np.float32)
    if present is not None:
        out[~np.asarray(present).ravel()] = np.nan
    return out


class ViewMeanSession(ReconstructionSession):
    def __init__(self, engine, geometry, background) -> None:
        super().__init__(geometry)
        self.engine = engine
        self.background_means = np.asarray(background, dtype=np.float64).mean(axis=(2, 3))
        self.means = np.full((2, geometry.n_views), np.nan)

    def _add_view(self, polarization, view, hologram) -> None:
        if self.engine.gate is not None and not self.engine.gate.wait(DEADLINE_S):
            raise RuntimeError("test gate never opened")
        if self.engine.fail_at == (polarization, view):
            raise RuntimeError("injected engine failure")
        self.means[polarization, view] = float(np.mean(hologram, dtype=np.float64)) - self.background_means[polarization, view]

    def finalize(self, allow_missing: bool = False) -> Volume:
        if not self.complete and not allow_missing:
            raise ValueError("views missing")
        shape = self.geometry.volume_shape
        ne = np.zeros(shape, dtype=np.float32)
        ne.ravel()[: self.means.size] = self.means.ravel()
        return Volume(ne, np.full(shape, self.received.sum(), np.float32), np.zeros((3, *shape), np.float32),
                      self.geometry.voxel_size_m, self.geometry.medium_index, {"method": "view-mean"})


class ViewMeanReconstructor(Reconstructor):
    name = "view-mean"

    def __init__(self, gate: threading.Event | None = None, fail_at=None, reject_start: bool = False) -> None:
        self.gate = gate
        self.fail_at = fail_at
        self.reject_start = reject_start

    def start(self, geometry, background) -> ViewMeanSession:
        if self.reject_start:
            raise ValueError("this engine does not take that geometry")
        return ViewMeanSession(self, geometry, background)


def streamed_means(volume: Volume, geometry) -> np.ndarray:
    return volume.ne.ravel()[: 2 * geometry.n_views]


class Collector:
    """Thread-safe sink for service callbacks, with deadline-bounded waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._unclaimed: list = []
        self.volumes: list = []
        self.errors: list = []
        self.statuses: list = []

    def _add(self, kind, value) -> None:
        with self._cond:
            self._unclaimed.append((kind, value))
            self._cond.notify_all()

    def on_volume(self, result) -> None:
        self.volumes.append(result)
        self._add("volume", result)

    def on_error(self, error) -> None:
        self.errors.append(error)
        self._add("error", error)

    def on_status(self, status) -> None:
        self.statuses.append(status)

    def callbacks(self) -> dict:
        return dict(on_volume=self.on_volume, on_error=self.on_error, on_status=self.on_status)

    def wait(self, predicate, timeout_s: float = DEADLINE_S):
        """Claim the first callback item (kind, value), earlier or yet to come, satisfying ``predicate``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i, item in enumerate(self._unclaimed):
                    if predicate(*item):
                        del self._unclaimed[i]
                        return item[1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no matching callback before the deadline")
                self._cond.wait(remaining)

    def wait_volume(self, acquisition_id: str, timeout_s: float = DEADLINE_S):
        return self.wait(lambda kind, v: kind == "volume" and v.acquisition_id == acquisition_id, timeout_s)

    def wait_error(self, reason: str, timeout_s: float = DEADLINE_S):
        return self.wait(lambda kind, v: kind == "error" and v.reason == reason, timeout_s)


def wait_until(condition, timeout_s: float = DEADLINE_S, poll_s: float = 0.01) -> None:
    """Poll ``condition()`` until true; a deadline, not a sleep-to-wait."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met before the deadline")
        threading.Event().wait(poll_s)


class Lines:
    """A subprocess's output lines, read by a thread so that every wait has a deadline."""

    def __init__(self, stream) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.all: list[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))

    def next_starting(self, prefix: str, timeout_s: float = DEADLINE_S) -> str:
        while True:
            line = self.queue.get(timeout=timeout_s)
            self.all.append(line)
            if line.startswith(prefix):
                return line
