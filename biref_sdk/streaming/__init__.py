"""Streaming acquisition over ZeroMQ (docs/protocol.md, "biref/2").

- :class:`AcquisitionService`: the in-process core (drive it from Python, get callbacks);
- :class:`StreamingServer`: the service on ZeroMQ sockets (``biref serve``);
- :class:`Producer`, :class:`Subscriber`: the microscope and result-consumer clients;
- :mod:`.protocol`: encoding and validating decoding of the wire messages.

zmq is imported only when one of these is first used.
"""
from __future__ import annotations

import importlib

# default endpoints: loopback only, so nothing is exposed to the network unless asked for
DEFAULT_INGEST = "tcp://127.0.0.1:5555"
DEFAULT_RESULTS = "tcp://127.0.0.1:5556"

_LAZY = {
    "PROTOCOL": "protocol", "Limits": "protocol", "ProtocolError": "protocol",
    "AcquisitionService": "service", "ServiceConfig": "service", "StreamResult": "service",
    "StreamError": "service", "AcquisitionFailed": "service", "AcquisitionHandle": "service",
    "StreamingServer": "server",
    "Producer": "client", "Subscriber": "client", "ResultError": "client",
    "CurveServer": "security", "CurveClient": "security", "generate_keys": "security",
    "SimulatedMicroscope": "microscope",
}

__all__ = ["DEFAULT_INGEST", "DEFAULT_RESULTS", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'biref_sdk.streaming' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
