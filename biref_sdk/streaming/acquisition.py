"""One acquisition's state machine: plain and synchronous, no threads, no sockets.

:class:`AcquisitionMachine` takes the typed messages of one admitted acquisition (its ``start``,
then ``view``/``background`` frames and ``stop``, in arrival order) and the time they are handled,
drives its engine session, and answers each call with the outcomes to publish: rejected messages,
a failure, a volume or a preview, and the counters to add. The service (:mod:`.service`) owns the
threads, queues, memory budget and publishing around it; admission (duplicate ids, budget) is the
service's too, because it depends on the other acquisitions.

Phases: ``background`` (frames of the background still missing; early views wait in ``pending``)
→ ``views`` (the engine session is open) → ``done`` (a volume or a failure was produced; later
calls are refused by the service, which remembers finished ids).

Time comes from the caller (``now_s``, the messages' ``received_s``) and, for the latency of a
volume, from the injected ``clock``; so a test drives the machine with any times it likes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .._version import __version__
from ..files import Volume
from .protocol import Frame, Start, Stop


@dataclass(frozen=True)
class StreamResult:
    """A volume (or a preview) of one acquisition. ``latency_s``: from the arrival of the last view
    used to the volume being ready. ``complete`` is False when views were missing (``missing`` lists
    their (polarization, view))."""

    acquisition_id: str
    volume: Volume
    complete: bool
    views_used: int
    views_expected: int
    missing: tuple[tuple[int, int], ...]
    latency_s: float
    engine: str
    preview: bool = False
    incomplete_reason: str | None = None

    def header(self) -> dict:
        return {"acquisition_id": self.acquisition_id, "complete": self.complete, "views_used": self.views_used,
                "views_expected": self.views_expected, "missing": [list(m) for m in self.missing],
                "latency_s": self.latency_s, "engine": self.engine, "incomplete_reason": self.incomplete_reason,
                "sdk_version": __version__}


@dataclass(frozen=True)
class StreamError:
    """One rejected message or failed acquisition. ``fatal``: the acquisition was dropped (no volume
    will come for it); otherwise only the message was rejected and the acquisition carries on."""

    reason: str
    detail: str
    acquisition_id: str | None = None
    message_type: str | None = None
    fatal: bool = False
    rejected_message: bool = True
    polarization: int | None = None
    view: int | None = None

    def header(self) -> dict:
        return {"reason": self.reason, "detail": self.detail, "acquisition_id": self.acquisition_id,
                "message_type": self.message_type, "fatal": self.fatal, "polarization": self.polarization,
                "view": self.view}

    @classmethod
    def from_protocol_error(cls, error) -> "StreamError":
        # a start that is rejected never begins; a rejected view/background/stop leaves its acquisition running
        return cls(error.reason, error.detail, error.acquisition_id, error.message_type,
                   fatal=error.message_type == "start" and error.acquisition_id is not None)

    @classmethod
    def rejecting(cls, message, reason: str, detail: str, fatal: bool = False) -> "StreamError":
        return cls(reason, detail, message.acquisition_id, message.type, fatal=fatal,
                   polarization=getattr(message, "polarization", None), view=getattr(message, "view", None))


@dataclass
class Outcomes:
    """What one call of the machine produced, for the service to publish in this order: ``counts``,
    ``errors`` (rejections, then at most one fatal), then ``volume`` or ``preview``."""

    counts: dict[str, int] = field(default_factory=dict)
    errors: list[StreamError] = field(default_factory=list)
    volume: StreamResult | None = None
    preview: StreamResult | None = None

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def finished(self) -> bool:
        return self.volume is not None or any(e.fatal for e in self.errors)


class AcquisitionMachine:
    """The state of one admitted acquisition. ``reconstructor.start(geometry, background)`` opens
    the engine session once the background is whole; ``engine`` names it in errors and results."""

    def __init__(self, start: Start, reconstructor, engine: str, preview_every: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        g = start.geometry
        self.id = start.acquisition_id
        self.geometry = g
        self.dtype = start.dtype
        self.shape = g.hologram_shape
        self.reconstructor = reconstructor
        self.engine = engine
        self.preview_every = preview_every
        self.clock = clock
        self.phase = "background"
        self.background: np.ndarray | None = None
        self.background_received = np.zeros((2, g.n_views), dtype=bool)
        self.pending: list[tuple[int, int, np.ndarray]] = []   # views that came before the background was whole
        self.session = None
        self.received = np.zeros((2, g.n_views), dtype=bool)
        self.n_received = 0
        self.highest_index = -1
        self.last_activity_s = start.received_s
        self.last_view_s = start.received_s

    # -- state ----------------------------------------------------------------------------------------
    @property
    def views_expected(self) -> int:
        return self.received.size

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def missing(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(p), int(v)) for p, v in np.argwhere(~self.received))

    def progress(self) -> str:
        background = int(self.background_received.sum()) if self.session is None else self.views_expected
        return f"{self.n_received}/{self.views_expected} views, {background}/{self.views_expected} background frames"

    # -- messages -------------------------------------------------------------------------------------
    def begin(self, start: Start) -> Outcomes:
        """The admitted ``start``: with the background inline, the engine session opens now."""
        out = Outcomes()
        if start.background is not None:
            self.background_received[:] = True
            self._open_session(np.array(start.background), start, out)
        else:
            self.background = np.zeros((2, self.geometry.n_views, *self.shape), self.dtype)
        return out

    def frame(self, message: Frame, now_s: float) -> Outcomes:
        out = Outcomes()
        self.last_activity_s = now_s
        v = message.view
        if message.frame.shape != self.shape or message.frame.dtype != self.dtype:
            out.errors.append(StreamError.rejecting(
                message, "shape_mismatch", f"frame {list(message.frame.shape)} {message.frame.dtype.name}, the start "
                f"announced {list(self.shape)} {self.dtype.name}"))
        elif v >= self.geometry.n_views:
            out.errors.append(StreamError.rejecting(message, "invalid_field",
                                                    f"view {v} outside 0..{self.geometry.n_views - 1}"))
        elif message.type == "background":
            self._background(message, out)
        else:
            self._view(message, out)
        return out

    def stop(self, message: Stop, now_s: float) -> Outcomes:
        out = Outcomes()
        self.last_activity_s = now_s
        if self.session is None or self.n_received == 0:
            self._fail(out, StreamError("incomplete", f"stop with nothing to reconstruct ({self.progress()})",
                                        self.id, "stop", fatal=True))
        else:
            self._finalize(out, "stop")
        return out

    def idle_for(self, now_s: float) -> float:
        return now_s - self.last_activity_s

    def expire(self, now_s: float, timeout_s: float, partial: bool) -> Outcomes:
        """No message for ``timeout_s``: a partial volume (``partial``, when views are present) or a
        ``timeout`` failure. Nothing happens if the acquisition was active since."""
        out = Outcomes()
        if self.done or self.idle_for(now_s) <= timeout_s:
            return out
        if partial and self.session is not None and self.n_received:
            self._finalize(out, "timeout")
        else:
            self._fail(out, StreamError("timeout", f"no message for {timeout_s:g} s ({self.progress()}); "
                                        "acquisition dropped", self.id, fatal=True, rejected_message=False))
        return out

    def shutdown(self) -> Outcomes:
        out = Outcomes()
        if not self.done:
            self._fail(out, StreamError("shutdown", f"service stopped with the acquisition in flight "
                                        f"({self.progress()})", self.id, fatal=True, rejected_message=False))
        return out

    # -- steps ----------------------------------------------------------------------------------------
    def _view(self, message: Frame, out: Outcomes) -> None:
        p, v = message.polarization, message.view
        if self.received[p, v]:
            out.errors.append(StreamError.rejecting(message, "duplicate_view", f"polarization {p} view {v} was "
                                                    "already received; the first is kept"))
            return
        self.received[p, v] = True
        self.n_received += 1
        self.last_view_s = message.received_s
        index = p * self.geometry.n_views + v
        if index < self.highest_index:
            out.count("out_of_order_views")   # fine: views may come in any order
        self.highest_index = max(self.highest_index, index)
        out.count("views_accepted")
        if self.session is None:
            self.pending.append((p, v, np.array(message.frame)))
            return
        if not self._add_view(p, v, message.frame, out):
            return
        if self.n_received == self.views_expected:
            self._finalize(out, None)
        elif self.preview_every and self.n_received % self.preview_every == 0:
            self._preview(out)

    def _background(self, message: Frame, out: Outcomes) -> None:
        p, v = message.polarization, message.view
        if self.session is not None or self.background_received[p, v]:
            out.errors.append(StreamError.rejecting(message, "duplicate_background", f"background polarization {p} "
                                                    f"view {v} was already received (or sent inline with the start)"))
            return
        self.background[p, v] = message.frame
        self.background_received[p, v] = True
        out.count("background_frames_accepted")
        if not self.background_received.all() or not self._open_session(self.background, message, out):
            return
        pending, self.pending = self.pending, []
        for p, v, frame in pending:
            if not self._add_view(p, v, frame, out):
                return
        if self.n_received == self.views_expected:
            self._finalize(out, None)

    def _open_session(self, background: np.ndarray, message, out: Outcomes) -> bool:
        try:
            self.session = self.reconstructor.start(self.geometry, background)
        except Exception as error:
            self._fail(out, StreamError.rejecting(message, "engine_rejected",
                                                  f"{self.engine}: {type(error).__name__}: {error}", fatal=True))
            return False
        self.background = None
        self.phase = "views"
        return True

    def _add_view(self, p: int, v: int, frame: np.ndarray, out: Outcomes) -> bool:
        try:
            self.session.add_view(p, v, frame)
            return True
        except Exception as error:
            self._fail(out, StreamError("engine_error", f"{self.engine} failed on polarization {p} view {v}: "
                                        f"{type(error).__name__}: {error}", self.id, "view", fatal=True,
                                        rejected_message=False, polarization=p, view=v))
            return False

    def _result(self, preview: bool, incomplete_reason: str | None) -> StreamResult:
        complete = self.n_received == self.views_expected
        volume = self.session.finalize() if complete else self.session.finalize(allow_missing=True)
        result = StreamResult(self.id, volume, complete, self.n_received, self.views_expected, self.missing(),
                              self.clock() - self.last_view_s, self.engine, preview, None if complete else incomplete_reason)
        volume.parameters = {**volume.parameters, "streaming": {k: v for k, v in result.header().items()
                                                                if k != "latency_s"}}
        return result

    def _finalize(self, out: Outcomes, incomplete_reason: str | None) -> None:
        try:
            out.volume = self._result(False, incomplete_reason)
        except Exception as error:
            # with views missing, an engine that cannot reconstruct from the few present is the
            # sender's incomplete acquisition, not an engine failure
            reason = "engine_error" if incomplete_reason is None else "incomplete"
            self._fail(out, StreamError(reason, f"{self.engine} failed to finalize ({self.progress()}): "
                                        f"{type(error).__name__}: {error}", self.id, fatal=True,
                                        rejected_message=False))
            return
        self.phase = "done"
        out.count("volumes")
        if not out.volume.complete:
            out.count("partial_volumes")

    def _preview(self, out: Outcomes) -> None:
        try:
            out.preview = self._result(True, "preview")
        except Exception as error:
            out.errors.append(StreamError("engine_error", f"preview failed: {type(error).__name__}: {error}",
                                          self.id, rejected_message=False))
            return
        out.count("previews")

    def _fail(self, out: Outcomes, error: StreamError) -> None:
        self.phase = "done"
        self.session = None
        self.background = None
        self.pending = []
        out.errors.append(error)

