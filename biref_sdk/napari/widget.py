"""A napari dock widget that shows the volumes of a running ``biref serve`` as they arrive.

A :func:`napari.qt.threading.thread_worker` generator receives on its own thread with
:class:`biref_sdk.streaming.Subscriber`; each volume or preview goes into a one-slot
:class:`LatestResult`, and a token is yielded only when the slot was empty, so the GUI thread
(the worker's ``yielded`` signal) always draws the newest volume and never a backlog.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qtpy.QtWidgets import (QCheckBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout,
                            QWidget)

log = logging.getLogger(__name__)

POLL_S = 0.2  # the worker yields at least this often, so it can be stopped and the state redrawn


class LatestResult:
    """A one-slot mailbox between threads: a new result replaces one not yet taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._result = None
        self.superseded = 0

    def put(self, result) -> bool:
        """Store ``result``; True when the slot was empty (the reader must be told)."""
        with self._lock:
            was_empty = self._result is None
            if not was_empty:
                self.superseded += 1
            self._result = result
            return was_empty

    def take(self):
        with self._lock:
            result, self._result = self._result, None
            return result


@dataclass
class StreamState:
    """What the widget shows about the stream; written by the worker, read by the GUI."""

    connected: bool = False
    volumes: int = 0
    previews: int = 0
    shown: int = 0
    errors: int = 0
    last_error: str = ""
    views: str = ""
    acquisition_id: str = ""
    service_latency_s: float | None = None
    display_delay_s: float | None = None
    consistency: dict | None = None  # the last volume's consistency check, when the service runs it
    missed: int = 0
    rejected: int = 0
    last_message_monotonic_s: float | None = None  # a silent service shows as a growing age

    def text(self, superseded: int) -> str:
        age = "" if self.last_message_monotonic_s is None else \
            f", last message {time.monotonic() - self.last_message_monotonic_s:.1f} s ago"
        lines = [f"{'connected' if self.connected else 'waiting for the service'}{age}",
                 f"received: {self.volumes} volumes, {self.previews} previews; shown {self.shown}, "
                 f"skipped {superseded} (newer arrived)"]
        if self.acquisition_id:
            lines.append(f"last: {self.acquisition_id}, views {self.views}")
        if self.service_latency_s is not None:
            lines.append(f"latency: {self.service_latency_s * 1e3:.0f} ms after the last view (service), "
                         f"shown {self.display_delay_s * 1e3:.0f} ms after receipt")
        if self.consistency:
            lines.append(f"consistency: {self.consistency['score']:.3f} (noise floor "
                         f"{self.consistency['noise_floor']:.3f}; 0: the volume explains the data)")
        lines.append(f"errors: {self.errors}{': ' + self.last_error if self.last_error else ''}; "
                     f"missed {self.missed}, rejected {self.rejected}")
        return "\n".join(lines)


def receive(address: str, topics: tuple[str, ...], curve, mailbox: LatestResult, state: StreamState):
    """Generator run by the worker thread: yields None to redraw the state, True when the mailbox
    holds a new result. Errors are counted and shown, never raised out of the thread."""
    from ..streaming.client import Subscriber

    with Subscriber(address, topics=(*topics, "error", "status"), curve=curve) as subscriber:
        while True:
            try:
                result = subscriber.recv(timeout_s=POLL_S)
            except TimeoutError:
                yield None
                continue
            except Exception as error:  # a broken socket: count it, keep the thread alive
                state.errors += 1
                state.last_error = f"{type(error).__name__}: {error}"
                log.warning("stream receive failed: %s", state.last_error)
                yield None
                continue
            state.last_message_monotonic_s = time.monotonic()
            state.missed, state.rejected = sum(subscriber.missed.values()), subscriber.rejected
            header = result.header
            if result.topic == "status":
                state.connected = True
                yield None
            elif result.topic == "error":
                state.errors += 1
                state.last_error = f"{header.get('reason')} ({header.get('acquisition_id')}): " \
                                   f"{str(header.get('detail', '')).splitlines()[0] if header.get('detail') else ''}"
                yield None
            else:
                state.connected = True
                if result.topic == "volume":
                    state.volumes += 1
                else:
                    state.previews += 1
                yield mailbox.put(result) or None


class StreamWidget(QWidget):
    """Dock widget: results endpoint, CURVE key files, topics; Connect / Disconnect; the stream's
    state. Volumes become the layers ``stream n_e``, ``stream n_o``, ``stream Δn`` and
    ``stream director``, updated in place."""

    PREFIX = "stream "

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from ..streaming import DEFAULT_RESULTS

        self.viewer = napari_viewer
        self.mailbox = LatestResult()
        self.state = StreamState()
        self.worker = None
        self.endpoint = QLineEdit(DEFAULT_RESULTS)
        self.server_key = QLineEdit()
        self.server_key.setPlaceholderText("server's public .key (CURVE; empty: plain TCP)")
        self.client_secret = QLineEdit()
        self.client_secret.setPlaceholderText("this client's .key_secret (CURVE)")
        self.volume_topic = QCheckBox("volumes")
        self.volume_topic.setChecked(True)
        self.preview_topic = QCheckBox("previews")
        self.preview_topic.setChecked(True)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(self.toggle)
        self.status = QLabel("not connected")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("results endpoint", self.endpoint)
        form.addRow("server key", self.server_key)
        form.addRow("client secret key", self.client_secret)
        topics = QHBoxLayout()
        topics.addWidget(self.volume_topic)
        topics.addWidget(self.preview_topic)
        form.addRow("topics", topics)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.connect_button)
        layout.addWidget(self.status)
        layout.addStretch()

    def curve(self):
        server, secret = self.server_key.text().strip(), self.client_secret.text().strip()
        if not server and not secret:
            return None
        if not (server and secret):
            raise ValueError("CURVE needs both the server's public key and this client's secret key")
        from ..streaming.security import CurveClient

        for path in (server, secret):
            if not Path(path).is_file():
                raise FileNotFoundError(f"CURVE key file not found: {path}")
        return CurveClient(Path(secret), Path(server))

    def toggle(self) -> None:
        if self.worker is None:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        from napari.qt.threading import thread_worker

        topics = tuple(t for t, box in (("volume", self.volume_topic), ("preview", self.preview_topic))
                       if box.isChecked())
        try:
            curve = self.curve()
        except (ValueError, OSError) as error:
            self.status.setText(f"cannot connect: {error}")
            return
        self.state = StreamState()
        self.worker = thread_worker(receive, start_thread=False)(self.endpoint.text().strip(), topics, curve,
                                                                 self.mailbox, self.state)
        self.worker.yielded.connect(self._on_yielded)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        self.connect_button.setText("Disconnect")
        self._show_state()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.quit()

    def _on_finished(self) -> None:
        self.worker = None
        self.state.connected = False
        self.connect_button.setText("Connect")
        self._show_state()

    def _on_errored(self, error) -> None:
        self.state.errors += 1
        self.state.last_error = f"{type(error).__name__}: {error}"
        self._show_state()

    def _on_yielded(self, new_result) -> None:
        result = self.mailbox.take() if new_result else None
        if result is not None:
            self.show_result(result)
        self._show_state()

    def show_result(self, result) -> None:
        """Draw a received volume (GUI thread): the stream layers' data replaced in place."""
        from .layers import volume_layers

        for data, kwargs, kind in volume_layers(result.volume, prefix=self.PREFIX):
            name = kwargs["name"]
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = data
                layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
                if "contrast_limits" in kwargs:
                    layer.contrast_limits = kwargs["contrast_limits"]
            else:
                getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        header = result.header
        self.state.shown += 1
        self.state.acquisition_id = f"{result.acquisition_id} ({result.topic})"
        self.state.views = f"{header.get('views_used')}/{header.get('views_expected')}"
        self.state.service_latency_s = header.get("latency_s")
        self.state.consistency = header.get("consistency") if isinstance(header.get("consistency"), dict) else None
        self.state.display_delay_s = time.perf_counter() - result.received_s

    def _show_state(self) -> None:
        self.status.setText(self.state.text(self.mailbox.superseded))

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.stop()
        super().closeEvent(event)
