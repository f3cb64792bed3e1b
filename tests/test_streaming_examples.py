"""The examples a vendor copies keep working: examples/producer.py (protocol only, no biref_sdk)
sends an acquisition file; examples/subscriber.py saves the volume and a figure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from biref_sdk.files import read_volume, write_acquisition
from biref_sdk.streaming.server import StreamingServer, safe_filename
from biref_sdk.streaming.service import ServiceConfig
from test_streaming_support import (DEADLINE_S, Lines, ViewMeanReconstructor, expected_view_means, random_acquisition,
                                    streamed_means, tiny_geometry)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_producer_and_subscriber_examples(tmp_path):
    geometry = tiny_geometry()
    acquisition = random_acquisition(geometry, seed=9)
    write_acquisition(tmp_path / "acquisition.h5", acquisition)
    config = ServiceConfig(status_interval_s=0.1)
    with StreamingServer(ViewMeanReconstructor(), "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config) as server:
        subscriber = subprocess.Popen([sys.executable, str(EXAMPLES / "subscriber.py"), "--connect",
                                       server.results_address, "--out", str(tmp_path / "out"), "--count", "1",
                                       "--timeout", str(DEADLINE_S)], stdout=subprocess.PIPE, text=True)
        try:
            lines = Lines(subscriber.stdout)
            lines.next_starting("ready", DEADLINE_S)
            producer = subprocess.run([sys.executable, str(EXAMPLES / "producer.py"), str(tmp_path / "acquisition.h5"),
                                       "--connect", server.ingest_address, "--id", "example/1", "--timeout",
                                       str(DEADLINE_S)], capture_output=True, text=True, timeout=DEADLINE_S)
            assert producer.returncode == 0, producer.stderr
            assert "saved" in lines.next_starting("saved", DEADLINE_S)
            assert subscriber.wait(DEADLINE_S) == 0
        finally:
            if subscriber.poll() is None:
                subscriber.kill()
                subscriber.wait(DEADLINE_S)
    volume = read_volume(tmp_path / "out" / f"{safe_filename('example/1')}.h5")
    np.testing.assert_allclose(streamed_means(volume, geometry), expected_view_means(acquisition), rtol=1e-6)
    assert (tmp_path / "out" / f"{safe_filename('example/1')}.png").read_bytes()[:4] == b"\x89PNG"
