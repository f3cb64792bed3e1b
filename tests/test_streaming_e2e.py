"""End to end over loopback TCP with the real formula reconstruction: simulated microscope ->
service -> subscriber, the streamed volume equal to the offline reconstruction of the same
acquisition; then the same through the command-line programs, and `biref demo`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from biref_sdk.files import read_volume
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.streaming.client import Producer, Subscriber
from biref_sdk.streaming.microscope import SimulatedMicroscope
from biref_sdk.streaming.server import StreamingServer
from biref_sdk.streaming.service import ServiceConfig
from test_streaming_support import Lines, wait_until

DEADLINE_S = 120.0   # generous: the formula engine shares two busy cores with everything else


def assert_same_volume(streamed, offline):
    """Equal within float32 summation-order noise (views may be added in another order)."""
    np.testing.assert_allclose(streamed.ne, offline.ne, rtol=0, atol=2e-5)
    np.testing.assert_allclose(streamed.no, offline.no, rtol=0, atol=2e-5)
    birefringent = (offline.ne - offline.no) > 2e-3
    assert birefringent.any()
    alignment = np.abs(np.sum(streamed.director * offline.director, axis=0))[birefringent]   # sign is arbitrary
    assert alignment.min() > 0.999


@pytest.fixture(scope="module")
def microscope():
    return SimulatedMicroscope("small", seed=0)


@pytest.fixture(scope="module")
def offline(microscope):
    return get_reconstructor("formula").reconstruct(microscope.acquisition(0))


def test_streamed_volume_equals_the_offline_reconstruction(microscope, offline):
    acquisition = microscope.acquisition(0)
    config = ServiceConfig(status_interval_s=0.1, acquisition_timeout_s=DEADLINE_S)
    with StreamingServer(get_reconstructor("formula"), "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config) as server, \
            Subscriber(server.results_address, topics=("volume", "error")) as subscriber:
        subscriber.wait_ready(DEADLINE_S)
        views = [(p, v) for p in range(2) for v in range(acquisition.geometry.n_views)]
        shuffled = [views[i] for i in np.random.default_rng(0).permutation(len(views))]
        with Producer(server.ingest_address, timeout_s=DEADLINE_S) as producer:
            # as microscope-sim sends it, then with per-view background messages and views shuffled
            sent = microscope.stream(producer, 1)[0]
            producer.send_acquisition(acquisition, "shuffled", background="messages", order=shuffled)
            # acquisitions reconstruct side by side: their volumes may come in either order
            volumes = {}
            subscriber.wait_for(lambda r: r.topic == "volume" and volumes.setdefault(r.acquisition_id, r)
                                and len(volumes) == 2, DEADLINE_S)
            first, second = volumes[sent["acquisition_id"]], volumes["shuffled"]
        status = server.status()
    for result in (first, second):
        assert result.header["complete"] and result.header["views_used"] == 74
        assert result.header["engine"] == "formula" and result.header["latency_s"] > 0
        assert_same_volume(result.volume, offline)
    assert status["rejected_messages"] == 0 and status["volumes"] == 2


def biref(*args):
    return [sys.executable, "-m", "biref_sdk", *args]


def test_serve_and_microscope_sim_commands_with_a_subscriber(tmp_path, offline):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    serve = subprocess.Popen(biref("serve", "--method", "formula", "--ingest", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
                                   "--save-dir", str(tmp_path / "volumes"), "--status-interval", "0.1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out = Lines(serve.stdout)
        ingest = out.next_starting("ingest ", DEADLINE_S).split()[1]
        results = out.next_starting("results ", DEADLINE_S).split()[1]
        with Subscriber(results, topics=("volume", "error")) as subscriber:
            subscriber.wait_ready(DEADLINE_S)
            sim = subprocess.run(biref("microscope-sim", "--preset", "small", "--n", "1", "--seed", "0",
                                       "--rate", "500", "--connect", ingest),
                                 capture_output=True, text=True, timeout=DEADLINE_S, env=env)
            assert sim.returncode == 0, sim.stderr
            assert "sent sim-0-0: 74 views" in sim.stdout
            result = subscriber.wait_volume("sim-0-0", DEADLINE_S)
        assert_same_volume(result.volume, offline)
        assert out.next_starting("volume sim-0-0", DEADLINE_S).endswith("after the last view")
        saved = tmp_path / "volumes" / "sim-0-0.h5"
        wait_until(saved.exists, DEADLINE_S)
        np.testing.assert_array_equal(read_volume(saved).ne, result.volume.ne)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(DEADLINE_S) == 0
        assert "stopped: 1 volumes, 0 rejected messages" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(DEADLINE_S)


def test_demo_command_streams_to_a_volume_file_and_a_figure(tmp_path, capsys):
    from biref_sdk.cli import main

    assert main(["demo", "--out", str(tmp_path), "--seed", "1", "--consistency-views", "2"]) == 0
    printed = capsys.readouterr().out
    volume_file = Path(printed.split("volume file: ")[1].split()[0])
    figure = Path(printed.split("figure:")[1].split()[0])
    volume = read_volume(volume_file)
    assert volume.shape == (32, 64, 64) and volume.parameters["streaming"]["complete"]
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"
    assert "ms after the last view arrived" in printed and "PSNR n_e" in printed
    assert "uncertainty: median spread of n_e" in printed and "consistency: score" in printed
    assert volume.uncertainty is not None and volume.consistency.views_checked == 4


def test_concurrent_model_sessions_give_the_offline_volumes():
    from biref_sdk.streaming.service import AcquisitionService

    microscope = SimulatedMicroscope("small", seed=0)
    acquisitions = [microscope.acquisition(i) for i in range(2)]
    reconstructor = get_reconstructor("model", quarter_turns=False)
    offline = [reconstructor.reconstruct(a) for a in acquisitions]
    with AcquisitionService(reconstructor, ServiceConfig(workers=2, acquisition_timeout_s=DEADLINE_S)) as service:
        handles = [service.open(f"a{i}", a.geometry, background=a.background) for i, a in enumerate(acquisitions)]
        for p in range(2):
            for v in range(acquisitions[0].geometry.n_views):
                for handle, acquisition in zip(handles, acquisitions):   # both sessions encode side by side
                    handle.add_view(p, v, acquisition.holograms[p, v])
        results = [handle.result(DEADLINE_S) for handle in handles]
    for result, volume in zip(results, offline):
        np.testing.assert_array_equal(result.volume.ne, volume.ne)
        np.testing.assert_array_equal(result.volume.no, volume.no)
