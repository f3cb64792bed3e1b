"""The trained network behind the common :class:`Reconstructor` interface.

A session preprocesses each view as it arrives and keeps it; when a window has all its views
(both polarizations) their mean is encoded, and the 3D ConvGRU steps through every encoded
window that is next in sequence order. ``finalize`` is then the last steps, attention and
the decoder. The result equals the network's whole forward pass on the complete acquisition.

A network with the formula prior (``NetworkConfig.prior``) also feeds every view to a formula
session as it arrives; ``finalize`` finishes that session first and passes its volume to the
decoder. With ``quarter_turns`` the same runs for the acquisition turned by one, two and three
quarter turns about the optical axis (its windows are other sets of the same views), and the four
answers, turned back, are averaged.

The network's stages run on an inference engine (:mod:`biref_sdk.engines`: torch, ONNX Runtime
or TensorRT); the session uses the engine interface alone. ``finalize_timings_s`` records the
last ``finalize``'s stages (the benchmark's breakdown, docs/performance.md).
"""
from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..files import Volume
from ..geometry import Geometry
from ._eigen import symmetric_eigen
from .base import ReconstructionSession, Reconstructor


class ModelSession(ReconstructionSession):
    def __init__(self, reconstructor: "ModelReconstructor", geometry: Geometry, background: np.ndarray) -> None:
        from ..network.io import GeometryMismatchError, check_geometry
        from ..network.preprocess import InputPreprocessor

        super().__init__(geometry)
        model = reconstructor.model
        try:
            check_geometry(model.geometry, geometry)
        except GeometryMismatchError as error:
            raise GeometryMismatchError(
                f"{error}. To make a model for this microscope: biref geometry write ACQUISITION.h5 --out geometry.json; "
                "biref simulate --geometry geometry.json --n N --out train.h5 (and a val.h5); biref train --geometry "
                "geometry.json --data train.h5 --val val.h5 --out MODEL_DIR (docs/vendor-geometry.md); "
                "or use --method formula") from None
        self._model = model
        self._engine = reconstructor.engine
        config = model.config
        self._config = config
        self._preprocessor = InputPreprocessor(config, geometry, background)
        used = config.sequence_length * config.window_length
        # the original views that make window j of turn t (turn 0: the acquisition as recorded)
        view_maps = [np.arange(geometry.n_views)]
        if reconstructor.turn_sources is not None:
            for _ in range(3):
                view_maps.append(reconstructor.turn_sources[view_maps[-1]])
        self._window_views = [m[:used].reshape(config.sequence_length, config.window_length) for m in view_maps]
        self._waiting: dict[int, list[tuple[int, int]]] = {}  # original view -> (turn, window) it is part of
        for turn, windows in enumerate(self._window_views):
            for window, views in enumerate(windows):
                for view in views:
                    self._waiting.setdefault(int(view), []).append((turn, window))
        self._used = np.zeros(geometry.n_views, dtype=bool)  # views the network uses
        self._used[list(self._waiting)] = True
        c = config.channels_per_polarization
        self._views = torch.zeros(geometry.n_views, 2, c, *config.input_shape)  # per-view inputs as they arrive
        turns = len(view_maps)
        self._features: list[list[torch.Tensor | None]] = [[None] * config.sequence_length for _ in range(turns)]
        self._states: list[list[torch.Tensor]] = [[] for _ in range(turns)]
        self._hidden = [self._engine.initial_hidden() for _ in range(turns)]
        # each turn's decoder features (a Future), decoded on the reconstructor's decode thread as
        # soon as its last GRU step is done: before the last view where the view that completes it
        # is not the acquisition's last, beside the work of the views still arriving
        self._decode_thread = reconstructor.decode_thread
        self._decoded: list[Future | None] = [None] * turns
        self._prior_session = None
        if config.prior != "none":
            # the prior's warm start (FormulaOptions.late_views) on the decode thread: before the decoder,
            # which needs the views after it
            self._prior_session = reconstructor.prior_reconstructor().start(
                geometry, background, executor=reconstructor.decode_thread())

    def _add_view(self, polarization: int, view: int, hologram: np.ndarray) -> None:
        if self._prior_session is not None:  # the formula uses every view, also those past the last window
            self._prior_session.add_view(polarization, view, hologram)
        waiting = self._waiting.get(view)
        if not waiting:
            return  # a view beyond the last whole window: the network does not use it
        self._views[view, polarization] = self._preprocessor.view(polarization, view, hologram)
        received = self.received.copy()
        received[polarization, view] = True  # the base class marks it after this call
        for turn, window in waiting:
            if received[:, self._window_views[turn][window]].all():
                self._features[turn][window] = self._window_features(turn, window, received)
                self._advance(turn)

    @torch.no_grad()
    def _window_features(self, turn: int, window: int, received: np.ndarray) -> torch.Tensor:
        from ..network.symmetry import turn_inputs

        views = self._window_views[turn][window]
        counts = torch.as_tensor(np.maximum(received[:, views].sum(axis=1), 1), dtype=torch.float32)
        # the mean of each polarization's views (missing ones are zero: no sample signal)
        mean = self._views[views].sum(dim=0) / counts[:, None, None, None]  # [2, c, H', W']
        x = mean.reshape(-1, *self._config.input_shape)
        for _ in range(turn):
            x = turn_inputs(x)
        return self._engine.encode(x[None, :, None].to(self._engine.device))

    @torch.no_grad()
    def _advance(self, turn: int) -> None:
        states, features = self._states[turn], self._features[turn]
        while len(states) < self._config.sequence_length and features[len(states)] is not None:
            step = len(states)
            self._hidden[turn] = self._engine.gru_step(self._hidden[turn], features[step])
            features[step] = None
            states.append(self._hidden[turn])
        if len(states) == self._config.sequence_length and self._decoded[turn] is None:
            self._decoded[turn] = self._decode_thread().submit(self._engine.decode, torch.stack(states, dim=1))

    def missing_views(self) -> int:
        """Views the network uses that have not arrived."""
        return int((~self.received[:, self._used]).sum())

    @torch.no_grad()
    def finalize(self, allow_missing: bool = False) -> Volume:
        from ..network.symmetry import turn_output

        missing = self.missing_views()
        if missing and not allow_missing:
            raise ValueError(f"{missing} views are missing; pass allow_missing=True to reconstruct without them")
        # finalize leaves the session as it was (a preview may be followed by more views)
        clock = _StageClock(self._engine.device)
        turns = len(self._states)
        # the prior first: the decode thread may still be finishing the last turns meanwhile
        prior = None
        if self._prior_session is not None:
            from .prior import formula_prior
            from ..network.symmetry import turn_prior

            prior = formula_prior(self._prior_session.finalize(allow_missing=allow_missing), self._config)
            priors = [prior]
            for _ in range(1, turns):
                priors.append(turn_prior(priors[-1]))
            prior = torch.stack(priors).to(self._engine.device)
            clock.lap("formula_prior")
        decoded = []
        for turn in range(turns):
            if self._decoded[turn] is not None:
                decoded.append(self._decoded[turn].result())  # its exception, if any, raises here
                continue
            states, hidden = list(self._states[turn]), self._hidden[turn]
            for step in range(len(states), self._config.sequence_length):
                features = self._features[turn][step]
                if features is None:  # with views missing: the mean of those present
                    features = self._window_features(turn, step, self.received)
                hidden = self._engine.gru_step(hidden, features)
                states.append(hidden)
            decoded.append(self._engine.decode(torch.stack(states, dim=1)))
        decoded = torch.cat(decoded)  # a batch of the turns
        clock.lap("decode")
        ne, no, q, *predicted = self._engine.readout(decoded, prior)  # predicted: the uncertainty head's
        clock.lap("readout")
        # each turn's answer turned back, then their mean (of Q, so the director is sign-free)
        if turns > 1:
            answers = [torch.stack(a) for a in zip(*(turn_output(ne[t], no[t], q[t], -t) for t in range(turns)))]
            ne, no, q = (a.mean(dim=0) for a in answers)
            clock.lap("turns_back")
        else:
            ne, no, q = ne[0], no[0], q[0]
        director = director_from_q_shared(q, self._decode_thread()).cpu()
        clock.lap("director")
        uncertainty = None
        if turns > 1:  # measured: the turns' spread
            uncertainty = turn_spread(answers[0].cpu(), answers[1].cpu(), answers[2].cpu(), director)
            clock.lap("uncertainty")
        elif predicted:  # one pass of a model that learnt the turns' spread
            uncertainty = predicted[0][0].cpu()
        self.finalize_timings_s = clock.laps  # the last finalize's stages (the benchmark's breakdown)
        parameters = {"method": "model", "model_sha256": self._model.sha256,
                      "model_file": os.path.basename(self._model.path or ""), "missing_views": missing,
                      "window_length": self._config.window_length, "sequence_length": self._config.sequence_length,
                      "prior": self._config.prior, "quarter_turns": turns > 1, "engine": self._engine.describe(),
                      "uncertainty": "quarter-turn spread" if turns > 1 else
                      ("predicted (uncertainty head)" if uncertainty is not None else "none")}
        return Volume(ne=ne.cpu().numpy(), no=no.cpu().numpy(), director=director.numpy(),
                      voxel_size_m=self.geometry.voxel_size_m, medium_index=self.geometry.medium_index,
                      parameters=parameters, uncertainty=None if uncertainty is None else uncertainty.numpy())


class _StageClock:
    """Wall time of consecutive stages (seconds), for the latency breakdown."""

    def __init__(self, device: torch.device) -> None:
        self.laps: dict[str, float] = {}
        # CUDA work is asynchronous: each lap waits for its stage's kernels, so the time is its own
        self._synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        self._synchronize()
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now


def turn_spread(ne: torch.Tensor, no: torch.Tensor, q: torch.Tensor, director: torch.Tensor) -> torch.Tensor:
    """The per-voxel uncertainty ``[3, Z, Y, X]`` from the quarter turns' answers (``ne``, ``no``
    ``[T, Z, Y, X]``, ``q`` ``[T, 5, Z, Y, X]``, turned back): the RMS deviation of n_e and of n_o
    from their mean (refractive-index units) and the RMS angle (radians) between each turn's
    director and ``director``, the mean's. The turns see the same views in other windows, so their
    disagreement is the network's own doubt; it does not see an error all turns share.

    The angle comes in closed form, without an eigen-decomposition per turn (this runs after the
    last view): a uniaxial ``Q = S (d d^T - I/3)`` has ``d'^T Q d' = S (cos^2 - 1/3)`` and
    ``|Q|_F = S sqrt(2/3)``, with ``|Q|_F`` the norm of its components in the orthonormal
    :data:`Q_BASIS`; exact for uniaxial answers, an estimate otherwise."""
    x, y, z = director.to(q.device, q.dtype)
    r2 = math.sqrt(2.0)
    # d^T B_k d for the five Q_BASIS matrices, written out
    along = torch.stack([(x * x - y * y) / r2, (2 * z * z - x * x - y * y) / math.sqrt(6.0),
                         r2 * x * y, r2 * x * z, r2 * y * z])  # [5, Z, Y, X]
    projection = (q * along).sum(dim=1)  # d^T Q_t d, [T, Z, Y, X]
    order = torch.sqrt(1.5 * (q * q).sum(dim=1)).clamp_min(1e-12)  # S_t
    cosine = torch.sqrt((projection / order + 1.0 / 3.0).clamp(0.0, 1.0))
    angle = torch.arccos(cosine).pow(2).mean(dim=0).sqrt()
    # written out: torch's std over the leading dimension is ~10x slower on the CPU
    spread = [(a - a.mean(dim=0)).pow(2).mean(dim=0).sqrt() for a in (ne, no)]
    return torch.stack([*spread, angle]).float()


def director_from_q(q: torch.Tensor) -> torch.Tensor:
    """Q components ``[5, Z, Y, X]`` -> director ``[3, Z, Y, X]``: the unit eigenvector of Q with the
    largest eigenvalue (closed form, ``_eigen.symmetric_eigen``: that eigenvector alone, in float32;
    on the shipped model's volumes within 0.06 deg of the full float64 decomposition in every voxel,
    and 3-4x faster; z^ where Q is isotropic), its sign fixed so the largest-magnitude component
    is positive."""
    from ..network.model import Q_BASIS

    # the six tensor components (xx, yy, zz, xy, xz, yz) of sum_k q_k B_k, as one matrix product
    basis = Q_BASIS.to(q.device, torch.float32).reshape(5, 9)[:, [0, 4, 8, 1, 2, 5]]
    t6 = (basis.T @ q.to(torch.float32).reshape(5, -1)).reshape(6, *q.shape[1:])
    _, _, d = symmetric_eigen(t6)  # [3, Z, Y, X], of the largest eigenvalue
    largest = torch.where(d[0].abs() >= d[1].abs(), d[0], d[1])
    largest = torch.where(d[2].abs() > largest.abs(), d[2], largest)
    return d * torch.where(largest < 0, -1.0, 1.0)


# torch runs an element-wise op on at most this many elements on one thread (its intra-op grain)
_ONE_THREAD_VOXELS = 32768


def director_from_q_shared(q: torch.Tensor, executor, chunk_voxels: int = _ONE_THREAD_VOXELS) -> torch.Tensor:
    """:func:`director_from_q`, the same values, with the work shared with ``executor``'s thread:
    in chunks small enough that each of the many element-wise passes runs on one thread (on 2 CPU
    cores twice as fast as the whole volume's passes split across both), every other chunk on the
    executor. Its share comes back to the caller if the executor is busy (another session's decoder).
    On a GPU the whole volume at once, where it is: a few element-wise passes there."""
    flat = q.reshape(5, -1)
    starts = list(range(0, flat.shape[1], chunk_voxels))
    if q.device.type != "cpu" or len(starts) < 2:
        return director_from_q(q)
    out = torch.empty(3, flat.shape[1], dtype=torch.float32, device=q.device)

    def work(chunks) -> None:
        for s in chunks:
            out[:, s:s + chunk_voxels] = director_from_q(flat[:, s:s + chunk_voxels])

    helper = executor.submit(work, starts[1::2])
    work(starts[0::2])
    if helper.cancel():
        work(starts[1::2])
    else:
        helper.result()
    return out.reshape(3, *q.shape[1:])


class ModelReconstructor(Reconstructor):
    """The paper's network from a model file (checksum verified; nothing is downloaded).

    ``model``: a path to a model file or a :class:`~biref_sdk.network.io.LoadedModel`.
    ``quarter_turns``: also run the network on the acquisition turned by one, two and three
    quarter turns about the optical axis (:mod:`biref_sdk.network.symmetry`, exact for the ring
    illumination) and average the four answers, turned back: about 2 dB more PSNR for the shipped
    model (MODEL_CARD.md). The turned sequences are encoded as their views arrive too, but their
    windows mix early and late views, so more work is left for ``finalize`` (three more decoder
    passes). ``None`` (default): the model's own default (``NetworkConfig.quarter_turns``; a model
    distilled from the turns' mean runs one pass) where its geometry and inputs allow it.
    """

    name = "model"

    def __init__(self, model=None, device: str | None = None, threads: int | None = None,
                 quarter_turns: bool | None = None, engine: str = "auto", precision: str = "fp32") -> None:
        """``model``: a model file, a loaded model, or None for the shipped ``small`` model.
        ``engine``: ``auto``, ``torch``, ``onnxruntime`` or ``tensorrt`` (:mod:`biref_sdk.engines`);
        ``device``: ``cpu``, ``cuda`` or None (the engine's choice); ``precision``: ``fp32``, or
        ``fp16``/``bf16`` where the engine runs them (GPU)."""
        from ..engines import create_engine
        from ..network.io import LoadedModel, load_model, shipped_model_path

        # threads reach the engine alone (ONNX Runtime sessions); torch's thread count is
        # process-wide and the program's to set (biref: --option model.threads=N)
        if model is None:
            model = shipped_model_path()
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.engine = create_engine(engine, self.model, device=device, threads=threads, precision=precision)
        self.device = self.engine.device
        self._prior_reconstructor = None
        self._lock = threading.Lock()
        self._decoder: ThreadPoolExecutor | None = None
        self.turn_sources = self._turn_sources(quarter_turns)  # None: no quarter turns
        self.quarter_turns = self.turn_sources is not None

    def _turn_sources(self, quarter_turns: bool | None):
        """The view map of a quarter turn (network.symmetry) if the turns are on, else None."""
        from ..network.symmetry import quarter_turn_sources

        if quarter_turns is not None and not isinstance(quarter_turns, bool):
            raise ValueError(f"quarter_turns must be True, False or None, got {quarter_turns!r}")
        if quarter_turns is False or (quarter_turns is None and not self.model.config.quarter_turns):
            return None  # off, or the model's default is one pass (a distilled model)
        if self.model.config.input_mode != "field":
            problem = f"quarter_turns needs a network with field inputs, not {self.model.config.input_mode!r}"
        else:
            try:
                return quarter_turn_sources(self.model.geometry)
            except ValueError as error:
                problem = str(error)
        if quarter_turns:
            raise ValueError(problem)
        return None  # the default: on only where the symmetry holds

    def decode_thread(self) -> ThreadPoolExecutor:
        """The one worker thread that decodes for this reconstructor's sessions (started on first
        use; engines release the GIL while they compute, so it runs beside the view work)."""
        with self._lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="biref-decode")
            return self._decoder

    def prior_reconstructor(self):
        """The formula reconstructor of the model's prior, built once (it caches per-geometry tables)."""
        from .prior import formula_reconstructor

        if self._prior_reconstructor is None:
            self._prior_reconstructor = formula_reconstructor(self.model.config, device=self.device)
        return self._prior_reconstructor

    def start(self, geometry: Geometry, background: np.ndarray) -> ModelSession:
        return ModelSession(self, geometry, background)
