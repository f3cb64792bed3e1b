"""biref/1 encoding and validating decoding, including property-based fuzzing of the decoder."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biref_sdk.files import Consistency, Volume
from biref_sdk.streaming import protocol
from biref_sdk.streaming.protocol import Frame, Limits, ProtocolError, Start, Stop
from test_streaming_support import wire, tiny_geometry

GEOMETRY = tiny_geometry()



def header_of(frames) -> dict:
    return msgpack.unpackb(frames[0])


def with_header(frames, **changes):
    header = header_of(frames)
    for key, value in changes.items():
        if value is ...:
            header.pop(key, None)
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


def view_frames(frame=None, **changes):
    frame = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) if frame is None else frame
    return with_header(wire(protocol.encode_frame("view", "acq-1", 1, 2, frame)), **changes)


def reason_of(frames, limits=protocol.DEFAULT_LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_message(frames, limits)
    return info.value.reason


# -- round trips ---------------------------------------------------------------------------------------
def test_start_round_trip_with_inline_background():
    background = np.random.default_rng(0).integers(0, 60000, (2, 3, 32, 32)).astype(np.uint16)
    message = protocol.decode_message(wire(protocol.encode_start("acq-1", GEOMETRY, "uint16", background)))
    assert isinstance(message, Start)
    assert message.acquisition_id == "acq-1"
    assert message.geometry == GEOMETRY
    assert message.dtype == np.dtype("<u2") and message.shape == (32, 32) and message.n_views == 3
    np.testing.assert_array_equal(message.background, background)


def test_start_without_background_and_stop():
    start = protocol.decode_message(wire(protocol.encode_start("a", GEOMETRY, "float32")))
    assert start.background is None and start.dtype == np.dtype("<f4")
    stop = protocol.decode_message(wire(protocol.encode_stop("a")))
    assert isinstance(stop, Stop) and stop.acquisition_id == "a"


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_view_and_background_round_trip_every_wire_dtype(dtype):
    frame = (np.random.default_rng(1).random((5, 7)) * 200).astype(dtype)
    for kind in ("view", "background"):
        message = protocol.decode_message(wire(protocol.encode_frame(kind, "x", 0, 4, frame)))
        assert isinstance(message, Frame) and message.type == kind
        assert (message.polarization, message.view) == (0, 4)
        np.testing.assert_array_equal(message.frame, frame)


def test_big_endian_and_strided_frames_travel_as_little_endian_c_order():
    frame = np.arange(12, dtype=">u2").reshape(3, 4)[:, ::2]
    encoded = protocol.encode_frame("view", "x", 0, 0, frame)
    assert bytes(memoryview(encoded[1])) == np.ascontiguousarray(frame, dtype="<u2").tobytes()
    np.testing.assert_array_equal(protocol.decode_message(wire(encoded)).frame, frame)


def test_encoder_refuses_lossy_conversions():
    with pytest.raises(ValueError, match="range"):
        protocol.encode_frame("view", "x", 0, 0, np.full((2, 2), 70000), dtype="uint16")
    with pytest.raises(ValueError, match="cannot be sent"):
        protocol.encode_frame("view", "x", 0, 0, np.full((2, 2), 1.5), dtype="uint16")
    with pytest.raises(ValueError, match="cannot travel"):
        protocol.encode_frame("view", "x", 0, 0, np.zeros((2, 2), np.int64))


def test_result_round_trip():
    rng = np.random.default_rng(2)
    volume = Volume(rng.random((4, 5, 6)), rng.random((4, 5, 6)), rng.random((3, 4, 5, 6)), (1e-7, 5e-8, 5e-8), 1.54,
                    {"method": "x"})
    frames = wire(protocol.encode_result("volume", {"seq": 3, "acquisition_id": "a"}, volume))
    result = protocol.decode_result(frames)
    assert result.topic == "volume" and result.acquisition_id == "a" and result.header["seq"] == 3
    for name in ("ne", "no", "director"):
        np.testing.assert_array_equal(getattr(result.volume, name), getattr(volume, name))
    assert result.volume.parameters == {"method": "x"}
    assert result.volume.uncertainty is None and result.volume.consistency is None
    assert result.header["arrays"] == ["ne", "no", "director"] and result.header["protocol"] == "biref/2"
    status = protocol.decode_result(wire(protocol.encode_result("status", {"seq": 0, "volumes": 5})))
    assert status.volume is None and status.header["volumes"] == 5


def trusted_volume(rng) -> Volume:
    residual = np.full((2, 37), np.nan)
    residual[:, [0, 9, 18]] = rng.random((2, 3))
    return Volume(rng.random((4, 5, 6)), rng.random((4, 5, 6)), rng.random((3, 4, 5, 6)), (1e-7, 5e-8, 5e-8), 1.54,
                  uncertainty=rng.random((3, 4, 5, 6)),
                  consistency=Consistency(residual, score=0.25, noise_floor=0.2, time_s=0.1))


def test_result_round_trip_carries_the_trust_data():
    volume = trusted_volume(np.random.default_rng(3))
    frames = wire(protocol.encode_result("volume", {"seq": 0, "acquisition_id": "a"}, volume))
    assert len(frames) == 2 + 4
    result = protocol.decode_result(frames)
    assert result.header["arrays"] == ["ne", "no", "director", "uncertainty"]
    np.testing.assert_array_equal(result.volume.uncertainty, volume.uncertainty)
    c = result.volume.consistency
    assert (c.score, c.noise_floor, c.time_s, c.views_checked) == (0.25, 0.2, 0.1, 6)
    np.testing.assert_array_equal(c.residual, volume.consistency.residual)  # NaN (not checked) survives
    header = msgpack.unpackb(bytes(frames[1]))
    assert header["consistency"]["residual"][0][1] is None  # JSON-like: nil for a view not checked


def test_biref1_results_still_decode_and_trust_frames_are_checked():
    volume = trusted_volume(np.random.default_rng(4))
    frames = wire(protocol.encode_result("volume", {"seq": 0, "acquisition_id": "a"}, volume))
    old = msgpack.unpackb(bytes(frames[1]))
    old.update(protocol="biref/1", arrays=["ne", "no", "director"])
    del old["consistency"]
    result = protocol.decode_result([frames[0], msgpack.packb(old), *frames[2:5]])
    assert result.volume.uncertainty is None and result.volume.consistency is None
    short = [*frames[:5], bytes(frames[5])[:-4]]
    with pytest.raises(ProtocolError) as info:
        protocol.decode_result(short)
    assert info.value.reason == "size_mismatch"
    unknown = msgpack.unpackb(bytes(frames[1]))
    unknown["arrays"] = ["ne", "no", "director", "confidence"]
    with pytest.raises(ProtocolError) as info:
        protocol.decode_result([frames[0], msgpack.packb(unknown), *frames[2:]])
    assert info.value.reason == "invalid_field"


# -- each rejection has its reason --------------------------------------------------------------------
def test_header_faults_have_defined_reasons():
    assert reason_of([b"\xc1not msgpack"]) == "malformed"
    assert reason_of([msgpack.packb([1, 2])]) == "malformed"
    assert reason_of([]) == "malformed"
    assert reason_of(view_frames(protocol="biref/3")) == "unsupported_protocol"
    assert reason_of(view_frames(protocol="biref/0")) == "unsupported_protocol"
    assert reason_of(view_frames(protocol=...)) == "unsupported_protocol"
    assert reason_of(view_frames(type="hello")) == "unknown_type"
    assert reason_of(view_frames(acquisition_id=...)) == "invalid_field"
    assert reason_of(view_frames(acquisition_id=7)) == "invalid_field"
    assert reason_of(view_frames(acquisition_id="x" * 129)) == "invalid_field"
    assert reason_of(view_frames(acquisition_id="a\nb")) == "invalid_field"
    assert reason_of(view_frames(polarization=2)) == "invalid_field"
    assert reason_of(view_frames(polarization=True)) == "invalid_field"
    assert reason_of(view_frames(view=-1)) == "invalid_field"
    assert reason_of(view_frames(view=1.0)) == "invalid_field"
    assert reason_of(view_frames(shape=[32])) == "invalid_field"
    assert reason_of(view_frames(shape=[32, 0])) == "invalid_field"
    assert reason_of(view_frames(dtype="int64")) == "invalid_field"
    assert reason_of([msgpack.packb({"protocol": "biref/1", "pad": "x" * 70000})]) == "too_large"


def test_payload_faults_have_defined_reasons():
    frames = view_frames()
    assert reason_of(frames[:1]) == "frame_count"
    assert reason_of(frames + [b"extra"]) == "frame_count"
    assert reason_of([frames[0], frames[1][:-2]]) == "size_mismatch"
    assert reason_of([frames[0], frames[1] + b"\0\0"]) == "size_mismatch"
    assert reason_of(view_frames(dtype="float32")) == "size_mismatch"     # 32x32 uint16 bytes as float32
    assert reason_of(wire(protocol.encode_stop("a")) + [b"x"]) == "frame_count"
    big = view_frames(shape=[4096, 4096], dtype="float32")               # 64 MiB announced
    assert reason_of(big, Limits(max_frame_bytes=1 << 20)) == "too_large"
    assert reason_of(view_frames(shape=[9000, 10])) == "too_large"


def test_start_faults_have_defined_reasons():
    good = wire(protocol.encode_start("a", GEOMETRY))
    geometry = header_of(good)["geometry"]
    assert reason_of(with_header(good, n_views=4)) == "invalid_field"
    assert reason_of(with_header(good, geometry={**geometry, "na_objective": 2.0})) == "bad_geometry"
    assert reason_of(with_header(good, geometry={**geometry, "volume_shape": [4, 800, 8]})) == "bad_geometry"
    assert reason_of(with_header(good, geometry={k: v for k, v in geometry.items() if k != "voxel_size_m"})) \
        == "invalid_field"
    assert reason_of(with_header(good, geometry={**geometry, "wavelength_m": "green"})) == "invalid_field"
    assert reason_of(with_header(good, geometry={**geometry, "reference_carriers": [[0.3, 0.1]]})) == "invalid_field"
    assert reason_of(with_header(good, geometry={**geometry, "volume_shape": [1000, 1000, 1000]})) == "too_large"
    assert reason_of(with_header(good, geometry=[1, 2])) == "invalid_field"
    assert reason_of(good + [b"\0" * 10]) == "size_mismatch"                  # background of the wrong size
    background = np.zeros((2, 3, 32, 32), np.uint16)
    inline = wire(protocol.encode_start("a", GEOMETRY, background=background))
    assert reason_of(inline, Limits(max_frame_bytes=1000)) == "too_large"
    error = pytest.raises(ProtocolError, protocol.decode_message, with_header(good, n_views=4)).value
    assert (error.acquisition_id, error.message_type) == ("a", "start")


# -- fuzzing: the decoder answers every input with a message or a ProtocolError, nothing else ----------
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_keys = st.sampled_from(["protocol", "type", "acquisition_id", "polarization", "view", "shape", "dtype",
                         "n_views", "geometry", "seq", "x"])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=12),
                     st.binary(max_size=12), st.sampled_from(["biref/1", "view", "start", "stop", "background",
                                                              "uint16", "float32"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
                       max_leaves=12)


def _decode_or_protocol_error(frames, limits=protocol.DEFAULT_LIMITS):
    try:
        message = protocol.decode_message(frames, limits)
    except ProtocolError as error:
        assert error.reason in protocol.REASONS
        return None
    if isinstance(message, Frame):   # whatever got through is exactly what its header announced
        assert message.frame.ndim == 2 and message.frame.nbytes == len(frames[1])
    return message


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzz_arbitrary_bytes(frames):
    _decode_or_protocol_error(frames)


@FUZZ
@given(st.dictionaries(_keys, _values, max_size=8), st.lists(st.binary(max_size=40), max_size=3))
def test_fuzz_arbitrary_msgpack_headers(header, payload):
    header.setdefault("protocol", "biref/1")
    _decode_or_protocol_error([msgpack.packb(header, use_bin_type=True), *payload])


@FUZZ
@given(st.sampled_from(["view", "start", "stop", "background"]), _keys, _values,
       st.integers(0, 400), st.integers(0, 255), st.integers(-3, 3))
def test_fuzz_mutated_valid_messages(kind, key, value, position, byte, payload_delta):
    if kind == "start":
        frames = wire(protocol.encode_start("a", GEOMETRY, background=np.ones((2, 3, 32, 32), np.uint16)))
    elif kind == "stop":
        frames = wire(protocol.encode_stop("a"))
    else:
        frames = wire(protocol.encode_frame(kind, "a", 0, 1, np.ones((32, 32), np.uint16)))
    _decode_or_protocol_error(with_header(frames, **{key: value}))          # one field replaced
    raw = bytearray(frames[0])
    raw[position % len(raw)] = byte                                           # one header byte flipped
    _decode_or_protocol_error([bytes(raw), *frames[1:]])
    _decode_or_protocol_error([bytes(raw[: position % len(raw)]), *frames[1:]])   # header truncated
    if len(frames) > 1:                                                       # payload resized
        payload = frames[1][: max(0, len(frames[1]) + payload_delta)] if payload_delta < 0 else \
            frames[1] + b"\0" * payload_delta
        _decode_or_protocol_error([frames[0], payload])


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=6), st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_result_decoder(frames, header):
    for candidate in (frames, [b"volume", msgpack.packb({"protocol": "biref/1", "type": "volume", **header}), *frames],
                      [b"status", msgpack.packb(header)]):
        try:
            protocol.decode_result(candidate)
        except ProtocolError as error:
            assert error.reason in protocol.REASONS


@FUZZ
@given(st.sampled_from(["uint8", "uint16", "float32"]), st.integers(1, 9), st.integers(1, 9), st.integers(0, 1),
       st.integers(0, 1023), st.text(min_size=1, max_size=20).filter(str.isprintable), st.integers(0, 2**32 - 1))
def test_fuzz_valid_views_round_trip_exactly(dtype, h, w, polarization, view, acquisition_id, seed):
    frame = np.random.default_rng(seed).integers(0, 255, (h, w)).astype(dtype)
    message = protocol.decode_message(wire(protocol.encode_frame("view", acquisition_id, polarization, view, frame)))
    assert (message.acquisition_id, message.polarization, message.view) == (acquisition_id, polarization, view)
    np.testing.assert_array_equal(message.frame, frame)
