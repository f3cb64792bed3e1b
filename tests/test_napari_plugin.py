"""The napari plugin: the reader on the three file kinds, and the live widget against a real
`biref serve` on loopback (headless: QT_QPA_PLATFORM=offscreen)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
napari = pytest.importorskip("napari", reason="the napari plugin needs the [napari] extra")
pytest.importorskip("pytestqt", reason="the napari widget tests need pytest-qt")

from biref_sdk.files import Volume, write_acquisition, write_volume  # noqa: E402

# make_napari_viewer_proxy; napari's plugin is off for the rest of the suite (pyproject addopts)
pytest_plugins = ("napari.utils._testsupport",)

MANIFEST = Path(__file__).resolve().parents[1] / "biref_sdk" / "napari" / "napari.yaml"


@pytest.fixture(autouse=True)
def plugin_registered():
    """The manifest as napari finds it through the entry point; registered from the file when this
    checkout is not the installed one."""
    from npe2 import PluginManager

    manager = PluginManager.instance()
    if "biref_sdk" not in manager._manifests:
        manager.register(str(MANIFEST))
    yield


@pytest.fixture
def viewer(request):
    """napari's viewer model (layers, reader dispatch, no canvas): Qt's offscreen platform has no
    OpenGL for napari's canvas. The full Qt viewer is exercised by test_plugin_in_the_qt_viewer
    where a display is present."""
    from napari.components import ViewerModel

    return ViewerModel()


def small_volume(director=(0.0, 1.0, 0.0)) -> Volume:
    shape = (16, 20, 24)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    inside = ((z - 8) * 2) ** 2 + (y - 10) ** 2 + (x - 12) ** 2 <= 36
    d = np.broadcast_to(np.asarray(director, np.float32).reshape(3, 1, 1, 1), (3, *shape)).copy()
    return Volume(np.where(inside, 1.565, 1.54), np.where(inside, 1.55, 1.54), d, (100e-9, 50e-9, 50e-9), 1.54)


def test_reader_opens_a_volume_in_micrometres(tmp_path, viewer):
    path = tmp_path / "droplet.h5"
    write_volume(path, small_volume())
    viewer.open(str(path), plugin="biref_sdk")
    names = [layer.name for layer in viewer.layers]
    assert names == ["droplet n_e", "droplet n_o", "droplet Δn", "droplet director"]
    dn = viewer.layers["droplet Δn"]
    assert tuple(dn.scale) == pytest.approx((0.1, 0.05, 0.05))
    assert tuple(dn.translate) == pytest.approx((-0.8, -0.5, -0.6))   # voxel k centred at (k - N/2) d
    assert dn.data.max() == pytest.approx(0.015, abs=1e-6)
    vectors = viewer.layers["droplet director"].data          # [n, 2 (start, projection), (z, y, x)]
    assert len(vectors) > 0
    projection = vectors[:, 1] * np.asarray(dn.scale)         # µm
    np.testing.assert_allclose(projection / np.linalg.norm(projection, axis=1, keepdims=True),
                               np.tile([0.0, 1.0, 0.0], (len(vectors), 1)), atol=1e-6)
    centres = vectors[:, 0] + vectors[:, 1] / 2              # sign-free: centred on a droplet voxel
    assert np.all(dn.data[tuple(np.round(centres).astype(int).T)] > 0.01)


def test_reader_shows_the_uncertainty_with_the_consistency_as_metadata(tmp_path, viewer):
    from biref_sdk.files import Consistency

    volume = small_volume()
    volume.uncertainty = np.stack([np.abs(volume.ne - 1.54) * 0.1] * 3)
    volume.consistency = Consistency(np.full((2, 37), 0.2), score=0.12, noise_floor=0.1, time_s=0.2)
    write_volume(tmp_path / "trusted.h5", volume)
    viewer.open(str(tmp_path / "trusted.h5"), plugin="biref_sdk")
    layer = viewer.layers["trusted σ n_e"]
    assert layer.data.max() == pytest.approx(0.0025, abs=1e-6) and not layer.visible
    assert layer.metadata["consistency_score"] == pytest.approx(0.12)


def test_reader_opens_an_acquisition_as_hologram_stacks(tmp_path, viewer):
    from biref_sdk.streaming.microscope import SimulatedMicroscope

    microscope = SimulatedMicroscope("small", seed=1, id_prefix="napari")
    acquisition = microscope.acquisition(0)
    path = tmp_path / "acq.h5"
    write_acquisition(path, acquisition)
    viewer.open(str(path), plugin="biref_sdk")
    holograms = viewer.layers["acq holograms"]
    assert holograms.data.shape == acquisition.holograms.shape
    assert np.array_equal(np.asarray(holograms.data[1, 5]), acquisition.holograms[1, 5])
    assert tuple(holograms.scale)[2:] == pytest.approx((0.05, 0.05))
    assert "acq truth Δn" in viewer.layers and not viewer.layers["acq background"].visible


def test_reader_declines_other_files(tmp_path):
    from biref_sdk.napari.reader import get_reader

    other = tmp_path / "other.h5"
    import h5py

    with h5py.File(other, "w") as handle:
        handle["x"] = 1
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "a.tif")) is None


def test_latest_result_keeps_only_the_newest():
    from biref_sdk.napari.widget import LatestResult

    box = LatestResult()
    assert box.put("first") is True
    assert box.put("second") is False and box.put("third") is False
    assert box.take() == "third" and box.take() is None and box.superseded == 2


def start_serve(*extra: str):
    """A real `biref serve --method formula` on free loopback ports: (process, addresses)."""
    process = subprocess.Popen([sys.executable, "-m", "biref_sdk", "serve", "--method", "formula",
                                "--ingest", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
                                "--status-interval", "0.2", "--quiet", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addresses = {}
    for _ in range(2):  # the handshake lines: "ingest ADDR", "results ADDR"
        line = process.stdout.readline()
        if not line:
            process.kill()
            raise RuntimeError(f"biref serve did not start: {process.stderr.read()}")
        key, address = line.split()
        addresses[key] = address
    return process, addresses


def stop_serve(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def serve():
    process, addresses = start_serve("--preview-every", "37")
    yield addresses
    stop_serve(process)


def test_widget_shows_a_streamed_acquisition(serve, viewer, qtbot):
    from biref_sdk.napari.widget import StreamWidget

    widget = StreamWidget(viewer)
    qtbot.addWidget(widget)
    stream_and_check(widget, viewer, serve, qtbot)


def stream_and_check(widget, viewer, serve, qtbot):
    """Connect the widget to the service, stream one simulated acquisition, check its layers."""
    from biref_sdk.streaming.client import Producer
    from biref_sdk.streaming.microscope import SimulatedMicroscope

    widget.endpoint.setText(serve["results"])
    widget.connect_button.click()
    qtbot.waitUntil(lambda: widget.state.connected, timeout=30_000)   # the service's status heartbeat arrived

    microscope = SimulatedMicroscope("small", seed=2, id_prefix="napari")
    acquisition = microscope.acquisition(0)
    failure = []

    def stream():
        try:
            with Producer(serve["ingest"], timeout_s=60) as producer:
                # both polarizations of each view in turn, so the preview midway has complete views
                order = [(p, v) for v in range(acquisition.geometry.n_views) for p in range(2)]
                producer.send_acquisition(acquisition, "napari-0", order=order)
        except Exception as error:  # reported below
            failure.append(error)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    qtbot.waitUntil(lambda: widget.state.volumes >= 1 and "stream Δn" in viewer.layers
                    and widget.state.acquisition_id.endswith("(volume)"), timeout=120_000)
    thread.join(60)
    assert not failure
    layer = viewer.layers["stream Δn"]
    assert layer.data.shape == acquisition.truth.shape
    assert tuple(layer.scale) == pytest.approx(tuple(d * 1e6 for d in acquisition.truth.voxel_size_m))
    assert float(layer.data.max()) > 0.004                          # the droplet is there
    assert [n for n in ("stream n_e", "stream n_o", "stream director") if n in viewer.layers] == \
        ["stream n_e", "stream n_o", "stream director"]
    assert widget.state.previews >= 1, widget.state.last_error      # --preview-every 37: one preview midway
    assert widget.state.views == "74/74" and widget.state.errors == 0
    text = widget.status.text()
    assert "74/74" in text and "latency" in text and "errors: 0" in text
    widget.connect_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    assert widget.connect_button.text() == "Connect"


def test_widget_reports_bad_curve_settings(viewer, tmp_path, qtbot):
    from biref_sdk.napari.widget import StreamWidget

    widget = StreamWidget(viewer)
    qtbot.addWidget(widget)
    widget.server_key.setText(str(tmp_path / "server.key"))
    widget.connect_button.click()
    assert widget.worker is None and "both" in widget.status.text()
    widget.client_secret.setText(str(tmp_path / "client.key_secret"))
    widget.connect_button.click()
    assert widget.worker is None and "not found" in widget.status.text()


def test_plugin_in_the_qt_viewer(tmp_path, request):
    """napari's Qt viewer needs OpenGL, which Qt's offscreen platform lacks: with no display, the
    test runs itself again under xvfb-run (apt package xvfb), with Mesa's OpenGL."""
    if os.environ.get("DISPLAY"):
        make_napari_viewer_proxy = request.getfixturevalue("make_napari_viewer_proxy")
        path = tmp_path / "droplet.h5"
        write_volume(path, small_volume())
        viewer = make_napari_viewer_proxy()
        viewer.open(str(path), plugin="biref_sdk")
        assert [layer.name for layer in viewer.layers][-2:] == ["droplet Δn", "droplet director"]
        assert viewer.layers["droplet Δn"].data.max() == pytest.approx(0.015, abs=1e-6)
        _, widget = viewer.window.add_plugin_dock_widget("biref_sdk", "Live stream (biref serve)")
        assert widget.endpoint.text().startswith("tcp://") and widget.connect_button.text() == "Connect"
        stream_and_check(widget, viewer, request.getfixturevalue("serve"), request.getfixturevalue("qtbot"))
        return
    import shutil

    if shutil.which("xvfb-run") is None:
        pytest.skip("no display and no xvfb-run (apt package xvfb): napari's Qt viewer cannot open")
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    done = subprocess.run(["xvfb-run", "-a", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{__file__}::test_plugin_in_the_qt_viewer"], capture_output=True, text=True,
                          timeout=300, env=env)
    if done.returncode != 0 and "in qapp" in done.stderr + done.stdout:
        pytest.skip("Qt's xcb platform did not start under xvfb-run (libxcb-cursor0 and friends missing?)")
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


def test_newest_volume_wins_when_the_display_is_slower(serve):
    """The worker's generator against the service, with nobody taking from the mailbox (a busy
    GUI): of two volumes, only the newest is waiting, and the other is counted as skipped."""
    import time

    from biref_sdk.napari.widget import LatestResult, StreamState, receive
    from biref_sdk.streaming.client import Producer
    from biref_sdk.streaming.microscope import SimulatedMicroscope

    mailbox, state = LatestResult(), StreamState()
    worker = receive(serve["results"], ("volume",), None, mailbox, state)
    deadline = time.monotonic() + 30
    while not state.connected:
        next(worker)
        assert time.monotonic() < deadline, "no status heartbeat from biref serve"
    microscope = SimulatedMicroscope("small", seed=4, id_prefix="napari")
    with Producer(serve["ingest"], timeout_s=60) as producer:
        for name in ("first", "second"):
            producer.send_acquisition(microscope.acquisition(0), name)
    tokens = []
    deadline = time.monotonic() + 120
    while state.volumes < 2:
        tokens.append(next(worker))
        assert time.monotonic() < deadline, "the service published no two volumes"
    worker.close()
    assert tokens.count(True) == 1                        # the GUI is told once, not once per volume
    assert mailbox.take().acquisition_id == "second" and mailbox.superseded == 1


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="this libzmq has no CURVE support")
def test_widget_connects_with_curve_keys(tmp_path, viewer, qtbot):
    from biref_sdk.napari.widget import StreamWidget
    from biref_sdk.streaming.security import generate_keys

    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    client_public, client_secret = generate_keys(tmp_path / "client", "client")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes(client_public.read_bytes())
    process, addresses = start_serve("--curve-secret-key", str(server_secret),
                                     "--curve-authorized-keys", str(authorized))
    try:
        widget = StreamWidget(viewer)
        qtbot.addWidget(widget)
        widget.endpoint.setText(addresses["results"])
        widget.server_key.setText(str(server_public))
        widget.client_secret.setText(str(client_secret))
        widget.connect_button.click()
        # a status heartbeat decoded through the encrypted, authenticated socket
        qtbot.waitUntil(lambda: widget.state.connected, timeout=30_000)
        assert widget.state.errors == 0
        widget.connect_button.click()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=10_000)
    finally:
        stop_serve(process)
