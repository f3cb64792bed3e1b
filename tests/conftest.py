"""Fixtures shared by the test modules: ZeroMQ contexts and sockets that never linger, service and
server factories that always close what they made, tiny geometries and deadlines."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # test_streaming_support, imported by several modules

from test_streaming_support import DEADLINE_S, Collector, ViewMeanReconstructor, tiny_geometry  # noqa: E402

ANY_PORT = "tcp://127.0.0.1:0"


@pytest.fixture
def geometry():
    """3 views per polarization, 32 x 32 holograms, a 4 x 8 x 8 volume."""
    return tiny_geometry()


@pytest.fixture
def context():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def make_socket(context):
    """``make_socket(kind, connect=address)``: a socket with linger 0 that is closed after the test."""
    sockets = []

    def make(kind, connect=None, **options):
        socket = context.socket(kind)
        socket.linger = 0
        for name, value in options.items():
            setattr(socket, name, value)
        if connect is not None:
            socket.connect(connect)
        sockets.append(socket)
        return socket

    yield make
    for socket in sockets:
        socket.close(linger=0)


@pytest.fixture
def make_service():
    """``make_service(engine=None, config=...)`` -> (AcquisitionService, Collector); closed after the test."""
    from biref_sdk.streaming.service import AcquisitionService, ServiceConfig

    services = []

    def make(engine=None, config=None, **callbacks):
        collector = Collector()
        config = config or ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S)
        service = AcquisitionService(engine or ViewMeanReconstructor(), config, **{**collector.callbacks(), **callbacks})
        services.append(service)
        return service, collector

    yield make
    for service in services:
        service.close(timeout_s=DEADLINE_S)
        assert not service.alive


@pytest.fixture
def make_server(context):
    """``make_server(engine=None, config=..., **options)`` -> (StreamingServer, Collector) on loopback
    with free ports; closed after the test."""
    from biref_sdk.streaming.server import StreamingServer
    from biref_sdk.streaming.service import ServiceConfig

    servers = []

    def make(engine=None, config=None, **options):
        collector = Collector()
        config = config or ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S)
        server = StreamingServer(engine or ViewMeanReconstructor(), ANY_PORT, ANY_PORT, config,
                                 on_volume=collector.on_volume, on_error=collector.on_error, **options)
        servers.append(server)
        return server, collector

    yield make
    for server in servers:
        server.close(timeout_s=DEADLINE_S)


@pytest.fixture(scope="module")
def bipolar_droplet_acquisition():
    """A bipolar droplet (R 0.7 um, axis tilted 17 degrees from x) imaged in the `small` preset."""
    from biref_sdk.geometry import preset
    from biref_sdk.samples import Droplet, droplet_sample
    from biref_sdk.simulate import Simulator

    geometry = preset("small")
    droplet = Droplet((0.0, 0.0, 0.0), 0.7e-6, (1.0, 0.0, 0.3), "bipolar", 1.565, 1.548)
    return Simulator(geometry).acquire(droplet_sample([droplet], geometry), seed=2)
