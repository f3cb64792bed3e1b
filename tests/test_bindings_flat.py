"""The flat entry points of the C library for LabVIEW's Call Library Function Node and C#
P/Invoke (bindings/LABVIEW.md), called here the same way: through ctypes on the shared library,
with plain types and caller-allocated buffers. Also the decoding of result messages
(biref_result_decode) against biref_sdk.streaming.protocol, on real and on mutated messages."""
from __future__ import annotations

import ctypes as C
import time

import msgpack
import numpy as np
import pytest
import zmq

from bindings_support import DEADLINE_S, c_library, flat_library, decode as _decode  # noqa: F401 (fixture)
from biref_sdk.files import Consistency, Volume
from biref_sdk.streaming import protocol
from test_streaming_support import random_acquisition, tiny_geometry

OK, EINVAL, EPROTO, ENOTFOUND = 0, -1, -5, -6
P = C.c_void_p


@pytest.fixture(scope="module")
def lib(c_library):
    return flat_library(c_library.shared)


def _text(lib, result, field: str) -> str:
    out = C.create_string_buffer(600)
    assert lib.biref_result_text(result, field.encode(), out, len(out)) == OK
    return out.value.decode()


def _numbers(lib, result) -> dict:
    seq, used, expected = C.c_int64(), C.c_int64(), C.c_int64()
    complete, fatal, latency, shape = C.c_int32(), C.c_int32(), C.c_double(), (C.c_uint32 * 3)()
    assert lib.biref_result_numbers(result, C.byref(seq), C.byref(complete), C.byref(used), C.byref(expected),
                                    C.byref(latency), C.byref(fatal), shape) == OK
    return {"seq": seq.value, "complete": complete.value, "views_used": used.value, "views_expected": expected.value,
            "latency_s": latency.value, "fatal": fatal.value, "shape": tuple(shape)}


def _messages():
    shape = (2, 3, 4)
    rng = np.random.default_rng(1)
    volume = Volume(rng.random(shape, np.float32) + 1.5, rng.random(shape, np.float32) + 1.5,
                    rng.random((3, *shape), np.float32), (1e-7, 5e-8, 5e-8), 1.54, {"method": "x"})
    header = {"seq": 7, "time_unix_s": time.time(), "acquisition_id": "µ-1", "complete": True, "views_used": 73,
              "views_expected": 74, "missing": [[1, 5]], "latency_s": 0.05, "engine": "formula",
              "incomplete_reason": None, "sdk_version": "0"}
    error = {"seq": 0, "time_unix_s": 1.0, "reason": "bad_geometry", "detail": "x" * 600, "acquisition_id": None,
             "message_type": "start", "polarization": None, "view": None, "fatal": True}
    status = {"seq": 3, "time_unix_s": 1.0, "engine": "formula", "errors": {"malformed": 2}, "queue_bytes": 2**40}
    return volume, [protocol.encode_result("volume", header, volume), protocol.encode_result("error", error),
                    protocol.encode_result("status", status)]


def test_version(lib):
    assert lib.biref_version() == b"3.0.0"


def test_decoded_results_read_through_plain_types(lib):
    volume, (volume_message, error_message, status_message) = _messages()
    status, result = _decode(lib, volume_message)
    try:
        assert status == OK
        assert [_text(lib, result, f) for f in ("topic", "acquisition_id", "engine")] == ["volume", "µ-1", "formula"]
        assert _numbers(lib, result) == {"seq": 7, "complete": 1, "views_used": 73, "views_expected": 74,
                                         "latency_s": 0.05, "fatal": 0, "shape": (2, 3, 4)}
        ne, no, director = np.empty((2, 3, 4), np.float32), np.empty((2, 3, 4), np.float32), \
            np.empty((3, 2, 3, 4), np.float32)
        pointers = [a.ctypes.data_as(P) for a in (ne, no, director)]
        assert lib.biref_result_copy_volume(result, *pointers, 23) == EINVAL   # the caller's size must match
        assert lib.biref_result_copy_volume(result, *pointers, 24) == OK
        for name, array in (("ne", ne), ("no", no), ("director", director)):
            np.testing.assert_array_equal(array, getattr(volume, name))
        out = C.create_string_buffer(4)
        assert lib.biref_result_text(result, b"acquisition_id", out, 4) == OK and out.value == "µ-".encode()[:3]
        assert lib.biref_result_text(result, b"no_such_field", out, 4) == ENOTFOUND
    finally:
        lib.biref_result_delete(result)
    status, result = _decode(lib, error_message)
    try:
        assert status == OK and _text(lib, result, "reason") == "bad_geometry"
        assert _text(lib, result, "detail") == "x" * 511 and _text(lib, result, "acquisition_id") == ""
        assert _numbers(lib, result)["fatal"] == 1 and _numbers(lib, result)["shape"] == (0, 0, 0)
        assert lib.biref_result_copy_volume(result, None, None, None, 0) == EINVAL
    finally:
        lib.biref_result_delete(result)
    status, result = _decode(lib, status_message)
    assert status == OK and _numbers(lib, result)["seq"] == 3
    lib.biref_result_delete(result)


def _consistency(lib, result) -> tuple[float, int]:
    score, views = C.c_double(), C.c_int64()
    assert lib.biref_result_consistency(result, C.byref(score), C.byref(views)) == OK
    return score.value, views.value


def test_the_trust_data_reads_through_plain_types(lib):
    """biref/2: the uncertainty frame and the consistency score; a biref/1 volume still decodes."""
    volume, (plain_message, _, _) = _messages()
    residual = np.full((2, 37), np.nan)
    residual[:, :3] = 0.5
    volume.uncertainty = np.random.default_rng(2).random((3, *volume.shape), dtype=np.float32)
    volume.consistency = Consistency(residual, score=0.375, noise_floor=0.25, time_s=0.01)
    header = msgpack.unpackb(bytes(plain_message[1]))
    trusted = protocol.encode_result("volume", {k: header[k] for k in ("seq", "acquisition_id", "complete")}, volume)
    assert len(trusted) == 6
    status, result = _decode(lib, trusted)
    try:
        assert status == OK and _consistency(lib, result) == (0.375, 6)
        out = np.empty((3, *volume.shape), np.float32)
        assert lib.biref_result_copy_uncertainty(result, out.ctypes.data_as(P), 23) == EINVAL
        assert lib.biref_result_copy_uncertainty(result, out.ctypes.data_as(P), 24) == OK
        np.testing.assert_array_equal(out, volume.uncertainty)
    finally:
        lib.biref_result_delete(result)
    old = {**header, "protocol": "biref/1"}
    del old["consistency"]
    status, result = _decode(lib, [plain_message[0], msgpack.packb(old), *plain_message[2:]])
    try:
        score, views = _consistency(lib, result)
        out = np.empty((3, *volume.shape), np.float32)
        assert status == OK and np.isnan(score) and views == 0
        assert lib.biref_result_copy_uncertainty(result, out.ctypes.data_as(P), 24) == ENOTFOUND
    finally:
        lib.biref_result_delete(result)
    trusted_header = msgpack.unpackb(bytes(trusted[1]))
    refused = [[*trusted[:5], bytes(trusted[5])[:-4]],                    # a short uncertainty frame
               trusted[:5],                                               # announced, not sent
               [*plain_message, trusted[5]],                              # sent, not announced
               [trusted[0], msgpack.packb({**trusted_header, "consistency": {"score": "low"}}), *trusted[2:]],
               [trusted[0], msgpack.packb({**trusted_header, "consistency": [0.5]}), *trusted[2:]]]
    for frames in refused:
        status, result = _decode(lib, frames)
        lib.biref_result_delete(result)
        assert status == EPROTO
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_result(frames)   # the Python client refuses the same messages


def test_malformed_results_are_refused(lib):
    _, (volume_message, error_message, _) = _messages()
    header = bytes(error_message[1])
    bad = [[b"error", header[:n]] for n in range(len(header))]                       # every truncation
    bad += [[b"error", header + b"\x00"], [b"errors", header], [b"error", header, b"x"], [b"volume", header]]
    bad += [volume_message[:4], [*volume_message[:4], b"\x00" * 4], [volume_message[0], header, *volume_message[2:]]]
    # declared sizes far beyond the bytes: msgpack-c would reserve them before reading (200 GB, 1.5 MB each)
    bad += [[b"error", b"\xdf\xff\xff\xff\xff"], [b"error", b"\xdd\xff\xff\xff\xff"],
            [b"error", b"\x81\xa1k" + b"\xdc\xff\xff" * 1000], [b"error", b"\x91" * 100 + b"\xc0"]]
    bad += [[b"error", msgpack.packb({"protocol": "biref/3", "type": "error"})],
            [b"error", msgpack.packb({"protocol": "biref/1", "type": "status"})],
            [b"error", msgpack.packb({"protocol": "biref/1", "type": "error", 1: 2})]]
    for frames in bad:
        status, result = _decode(lib, frames)
        lib.biref_result_delete(result)
        assert status == EPROTO, [bytes(memoryview(f).cast("B"))[:24] for f in frames]


def test_mutated_results_decode_where_the_python_client_decodes_them(lib):
    """Bytes flipped, inserted and cut in real result headers: the C decoder never crashes, accepts
    every message that the Python client accepts (with the same topic and shape), save one whose
    acquisition_id is neither a string nor nil, which only the C decoder refuses."""
    rng = np.random.default_rng(0)
    _, messages = _messages()
    agreed = 0
    for _ in range(2000):
        frames = list(messages[rng.integers(len(messages))])
        header = bytearray(frames[1])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(header) + 1))
            edit = rng.integers(3)
            if edit == 0 and at < len(header):
                header[at] = int(rng.integers(256))
            elif edit == 1:
                header[at:at] = bytes(rng.integers(0, 256, rng.integers(1, 6), dtype=np.uint8))
            else:
                del header[at:at + int(rng.integers(1, 9))]
        frames[1] = bytes(header)
        try:
            reference = protocol.decode_result(frames)
        except (protocol.ProtocolError, ValueError, TypeError):
            reference = None
        if reference is not None and not isinstance(reference.header.get("acquisition_id"), (str, type(None))):
            reference = None   # the C decoder also requires a string or nil there (it fills a text field)
        status, result = _decode(lib, frames)
        try:
            if reference is not None:
                assert status == OK, bytes(header)
                assert _text(lib, result, "topic") == reference.topic
                if reference.volume is not None:
                    assert _numbers(lib, result)["shape"] == reference.volume.ne.shape
                agreed += 1
        finally:
            lib.biref_result_delete(result)
    assert agreed > 100   # the mutations leave many valid messages, so both paths are exercised


def test_flat_producer_sends_the_reference_encoders_bytes(lib):
    acquisition = random_acquisition(tiny_geometry(), seed=3)
    g, acquisition_id = acquisition.geometry, "flat/ü"
    holograms = np.ascontiguousarray(acquisition.holograms, np.uint16)
    background = np.ascontiguousarray(acquisition.background, np.uint16)
    _, n_views, height, width = holograms.shape
    sines = np.ascontiguousarray(g.illumination_sines, np.float64)
    carriers = np.ascontiguousarray(g.reference_carriers, np.float64)
    shape = np.asarray(g.volume_shape, np.uint32)
    voxel = np.asarray(g.voxel_size_m, np.float64)
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.linger = 0
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        producer = P()
        assert lib.biref_producer_open(C.byref(producer), None, f"tcp://127.0.0.1:{port}".encode(), 10000) == OK
        name = acquisition_id.encode()
        assert lib.biref_producer_start_flat(producer, name, g.wavelength_m, g.medium_index, g.na_objective,
                                             g.pixel_size_m, n_views, sines.ctypes.data, carriers.ctypes.data,
                                             shape.ctypes.data, voxel.ctypes.data, height, width, 1, None) == OK
        for kind, frames in ((0, background), (1, holograms)):
            for p in range(2):
                for v in range(n_views):
                    assert lib.biref_producer_frame_flat(producer, kind, name, p, v, height, width, 1,
                                                         frames[p, v].ctypes.data) == OK
        assert lib.biref_producer_frame_flat(producer, 2, name, 0, 0, height, width, 1, holograms.ctypes.data) \
            == EINVAL
        assert lib.biref_producer_frame_flat(producer, 1, name, 0, 0, height, width, 7, holograms.ctypes.data) \
            == EINVAL
        assert lib.biref_producer_stop(producer, name) == OK
        lib.biref_producer_close(producer, 10000)
        expected = [protocol.encode_start(acquisition_id, g, "uint16", None)]
        expected += [protocol.encode_frame(kind, acquisition_id, p, v, frames[p, v])
                     for kind, frames in (("background", background), ("view", holograms))
                     for p in range(2) for v in range(n_views)]
        expected.append(protocol.encode_stop(acquisition_id))
        for reference in expected:
            assert pull.poll(int(DEADLINE_S * 1000)), "a message did not come"
            frames = pull.recv_multipart()
            assert frames == [bytes(memoryview(f).cast("B")) for f in reference]
        assert not pull.poll(100)
