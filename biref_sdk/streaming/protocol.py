"""The ``biref/2`` wire protocol (docs/protocol.md): encoding and validating decoding.

Every message is multipart: one msgpack header frame (a map with string keys), then zero or more
raw array frames (C order, little-endian; dtype and shape come from the header). Nothing here
touches a socket, so the same code serves the ZeroMQ service, the in-process API and the fuzzer.

Decoding checks sizes before it allocates or interprets anything: the header's byte length, then
msgpack's own length limits, then every field, and only then the payload frames, whose byte count
must equal what the header announces. Every failure is a :class:`ProtocolError` carrying one of
the stable ``REASONS`` codes that the service reports on its ``error`` topic.
"""
from __future__ import annotations

import json
import math
import reprlib
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np

from ..geometry import GEOMETRY_ATTRIBUTES, Geometry

PROTOCOL = "biref/2"
# what receivers accept, ingest and results alike: biref/2 added trust data to the results only
ACCEPTED_PROTOCOLS = ("biref/1", "biref/2")

# ingest message types (microscope -> SDK) and result topics (SDK -> subscribers)
INGEST_TYPES = ("start", "background", "view", "stop")
TOPICS = ("volume", "preview", "error", "status")

# frame dtypes on the wire; always little-endian
WIRE_DTYPES = {"uint8": np.dtype("<u1"), "uint16": np.dtype("<u2"), "float32": np.dtype("<f4")}

# Stable reason codes of ``error`` messages and of the rejection counters in ``status``.
REASONS = (
    "malformed",              # not a multipart message with a msgpack map header
    "too_large",              # header, frame, geometry or volume beyond the service's limits
    "unsupported_protocol",   # "protocol" missing or not "biref/1"/"biref/2"
    "unknown_type",           # "type" not one of start/background/view/stop
    "invalid_field",          # a field missing, of the wrong type or out of range
    "bad_geometry",           # the geometry does not describe a working microscope
    "frame_count",            # wrong number of payload frames for the type
    "size_mismatch",          # payload bytes != prod(shape) * itemsize
    "shape_mismatch",         # view/background shape or dtype differs from the acquisition's start
    "unknown_acquisition",    # background/view/stop for an acquisition that was never started
    "acquisition_finished",   # ... for one that already produced its volume or timed out
    "duplicate_start",        # start for an acquisition already in flight
    "duplicate_view",         # a (polarization, view) already received (the first one is kept)
    "duplicate_background",   # a background frame already received, or background sent inline
    "too_many_acquisitions",  # start beyond the service's max_in_flight
    "engine_rejected",        # the reconstruction engine refused the geometry/background
    "engine_error",           # the engine failed while reconstructing; the acquisition is dropped
    "incomplete",             # stop with no usable views (or an incomplete background)
    "timeout",                # no message for an acquisition within acquisition_timeout_s
    "shutdown",               # the service stopped with the acquisition still in flight
    "internal_error",         # a bug in the service; reported, counted, the service carries on
)


class ProtocolError(ValueError):
    """A message that breaks ``biref/1``. ``reason`` is one of ``REASONS``; the other attributes are
    filled in as far as decoding got (so an error report can name the acquisition)."""

    def __init__(self, reason: str, detail: str, acquisition_id: str | None = None,
                 message_type: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason code {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.acquisition_id = acquisition_id
        self.message_type = message_type


@dataclass(frozen=True)
class Limits:
    """Sizes checked before anything is allocated. The defaults admit the ``paper`` preset with its
    background inline (2 x 37 x 512 x 512 float32 = 78 MB)."""

    max_header_bytes: int = 64 * 1024
    max_frame_bytes: int = 128 * 1024 * 1024
    max_views: int = 1024                    # illuminations per polarization
    max_hologram_side: int = 8192            # H and W
    max_volume_voxels: int = 1 << 24         # Z*Y*X of the result (paper: 8.8 M)
    max_id_length: int = 128                 # characters of acquisition_id

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Limits.{name} must be positive")

    def msgpack_options(self) -> dict:
        # msgpack's own caps, so a small header cannot announce (and make us allocate) a huge container
        n = self.max_header_bytes
        return dict(raw=False, strict_map_key=True, use_list=True, max_str_len=n,
                    max_bin_len=n, max_array_len=n, max_map_len=n, max_ext_len=n)


DEFAULT_LIMITS = Limits()


# -- messages --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    acquisition_id: str
    geometry: Geometry
    dtype: np.dtype
    background: np.ndarray | None       # [2, V, H, W] when sent inline, else None: background messages follow
    received_s: float = field(default_factory=time.perf_counter, compare=False)
    type = "start"

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.hologram_shape

    @property
    def n_views(self) -> int:
        return self.geometry.n_views


@dataclass(frozen=True)
class Frame:
    """A ``view`` (sample hologram) or ``background`` frame [H, W]."""

    type: str                           # "view" or "background"
    acquisition_id: str
    polarization: int
    view: int
    frame: np.ndarray
    received_s: float = field(default_factory=time.perf_counter, compare=False)


@dataclass(frozen=True)
class Stop:
    acquisition_id: str
    received_s: float = field(default_factory=time.perf_counter, compare=False)
    type = "stop"


Message = Start | Frame | Stop


# -- header validation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """A validated ingest header and the payload it announces: ``payload`` lists (shape, dtype) of
    the frames that must follow; for ``start`` the background frame is optional
    (``payload_optional``)."""

    type: str
    acquisition_id: str
    fields: dict
    payload: tuple[tuple[tuple[int, ...], np.dtype], ...]
    payload_optional: bool = False

    def payload_nbytes(self, index: int = 0) -> int:
        shape, dtype = self.payload[index]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _unpack(data, limits: Limits, what: str):
    size = len(data)
    if size > limits.max_header_bytes:
        raise ProtocolError("too_large", f"{what} is {size} bytes, limit {limits.max_header_bytes}")
    try:
        return msgpack.unpackb(data, **limits.msgpack_options())
    except Exception as error:  # msgpack raises several types (ExtraData, ValueError, TypeError, ...)
        raise ProtocolError("malformed", f"{what} is not valid msgpack ({type(error).__name__})") from None


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 40, 40, 4, 4


def _show(value) -> str:
    """A short description of an untrusted value for an error message: bounded in length and in
    nesting depth (msgpack nests containers up to its length limits; ``repr`` would recurse)."""
    try:
        return _SHOW.repr(value)[:60]
    except Exception:  # e.g. RecursionError; never let an error message raise
        return f"<{type(value).__name__}>"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (isinstance(value, float) or _is_int(value)) and math.isfinite(value)


class _Fields:
    """Typed access to header fields; each failure names the field."""

    def __init__(self, header: dict, message_type: str, acquisition_id: str | None = None) -> None:
        self.h = header
        self.type = message_type
        self.acquisition_id = acquisition_id

    def fail(self, detail: str, reason: str = "invalid_field"):
        raise ProtocolError(reason, detail, self.acquisition_id, self.type)

    def get(self, name: str):
        if name not in self.h:
            self.fail(f"{self.type} message lacks field {name!r}")
        return self.h[name]

    def int_in(self, name: str, low: int, high: int, value=None) -> int:
        value = self.get(name) if value is None else value
        if not _is_int(value) or not low <= value <= high:
            self.fail(f"{name} must be an integer in [{low}, {high}], got {_show(value)}")
        return value

    def shape(self, name: str, ndim: int, max_side: int) -> tuple[int, ...]:
        value = self.get(name)
        if not isinstance(value, list) or len(value) != ndim:
            self.fail(f"{name} must be a list of {ndim} integers, got {_show(value)}")
        for v in value:
            if not _is_int(v) or v < 1:
                self.fail(f"{name} must hold positive integers, got {_show(value)}")
            if v > max_side:
                self.fail(f"{name} {value} exceeds the limit {max_side}", "too_large")
        return tuple(value)

    def dtype(self, name: str = "dtype") -> np.dtype:
        value = self.get(name)
        if not isinstance(value, str) or value not in WIRE_DTYPES:
            self.fail(f"{name} must be one of {', '.join(WIRE_DTYPES)}, got {_show(value)}")
        return WIRE_DTYPES[value]


def _acquisition_id(header: dict, message_type: str, limits: Limits) -> str:
    value = header.get("acquisition_id")
    if not isinstance(value, str) or not value:
        raise ProtocolError("invalid_field", f"acquisition_id must be a non-empty string, got {_show(value)}",
                            None, message_type)
    if len(value) > limits.max_id_length or not value.isprintable():
        raise ProtocolError("invalid_field", f"acquisition_id must be at most {limits.max_id_length} printable "
                            "characters", None, message_type)
    return value


def _geometry(f: _Fields, shape: tuple[int, int], limits: Limits) -> Geometry:
    g = f.get("geometry")
    if not isinstance(g, dict):
        f.fail("geometry must be a map of the attributes of docs/formats.md")
    missing = [name for name in GEOMETRY_ATTRIBUTES if name not in g]
    if missing:
        f.fail(f"geometry lacks {', '.join(missing)}")

    def array(name, rows, cols):
        value = g[name]
        ok = isinstance(value, list) and (rows is None or len(value) == rows) and len(value) >= 1
        if ok and cols is not None:
            ok = all(isinstance(r, list) and len(r) == cols and all(_is_real(x) for x in r) for r in value)
        elif ok:
            ok = all(_is_real(x) for x in value)
        if not ok:
            want = f"{rows if rows is not None else 'V'} x {cols}" if cols else f"{rows} numbers"
            f.fail(f"geometry.{name} must be a list of {want}")
        return value

    for name in ("wavelength_m", "medium_index", "na_objective", "pixel_size_m"):
        if not _is_real(g[name]):
            f.fail(f"geometry.{name} must be a finite number, got {_show(g[name])}")
    sines = g["illumination_sines"]
    if isinstance(sines, list) and len(sines) > limits.max_views:
        f.fail(f"{len(sines)} illuminations exceed the limit {limits.max_views}", "too_large")
    array("illumination_sines", None, 2)
    array("reference_carriers", 2, 2)
    array("voxel_size_m", 3, None)
    volume_shape = g["volume_shape"]
    if not (isinstance(volume_shape, list) and len(volume_shape) == 3
            and all(_is_int(v) and v >= 1 for v in volume_shape)):
        f.fail("geometry.volume_shape must be 3 positive integers (Z, Y, X)")
    if math.prod(volume_shape) > limits.max_volume_voxels:
        f.fail(f"volume {volume_shape} exceeds {limits.max_volume_voxels} voxels", "too_large")
    try:
        return Geometry(hologram_shape=shape, **{name: g[name] for name in GEOMETRY_ATTRIBUTES})
    except Exception as error:  # Geometry validates physics; any failure there is the sender's geometry
        f.fail(f"geometry rejected: {error}", "bad_geometry")


def parse_header(data, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Validate an ingest header frame (bytes-like) and return what it announces."""
    header = _unpack(data, limits, "header")
    if not isinstance(header, dict):
        raise ProtocolError("malformed", f"header must be a msgpack map, got {type(header).__name__}")
    protocol = header.get("protocol")
    message_type = header.get("type") if isinstance(header.get("type"), str) else None
    if protocol not in ACCEPTED_PROTOCOLS:
        raise ProtocolError("unsupported_protocol", f"protocol must be one of {', '.join(ACCEPTED_PROTOCOLS)}, "
                            f"got {_show(protocol)}", None, message_type)
    if message_type not in INGEST_TYPES:
        raise ProtocolError("unknown_type", f"type must be one of {', '.join(INGEST_TYPES)}, "
                            f"got {_show(header.get('type'))}")
    acquisition_id = _acquisition_id(header, message_type, limits)
    f = _Fields(header, message_type, acquisition_id)
    if message_type == "stop":
        return Header("stop", acquisition_id, {}, ())
    shape = f.shape("shape", 2, limits.max_hologram_side)
    dtype = f.dtype()
    if message_type == "start":
        n_views = f.get("n_views")
        if _is_int(n_views) and n_views > limits.max_views:
            f.fail(f"n_views {n_views} exceeds the limit {limits.max_views}", "too_large")
        n_views = f.int_in("n_views", 1, limits.max_views)
        geometry = _geometry(f, shape, limits)
        if geometry.n_views != n_views:
            f.fail(f"n_views {n_views} != {geometry.n_views} illumination_sines")
        # the background inline is optional; its size is checked only if it is sent (check_payload)
        return Header("start", acquisition_id, {"geometry": geometry, "dtype": dtype},
                      (((2, n_views, *shape), dtype),), payload_optional=True)
    polarization = f.int_in("polarization", 0, 1)
    view = f.int_in("view", 0, limits.max_views - 1)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_frame_bytes:
        f.fail(f"frame of {nbytes} bytes exceeds the limit {limits.max_frame_bytes}", "too_large")
    return Header(message_type, acquisition_id, {"polarization": polarization, "view": view},
                  ((shape, dtype),))


def expected_frame_counts(header: Header) -> tuple[int, ...]:
    """Numbers of payload frames allowed after this header."""
    return (0, 1) if header.payload_optional else (len(header.payload),)


def check_payload(header: Header, n_frames: int, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise unless ``n_frames`` payload frames of the announced sizes may follow this header."""
    allowed = expected_frame_counts(header)
    if n_frames not in allowed:
        raise ProtocolError("frame_count", f"{header.type} takes {' or '.join(map(str, allowed))} payload "
                            f"frame(s), got {n_frames}", header.acquisition_id, header.type)
    for index in range(n_frames):
        if header.payload_nbytes(index) > limits.max_frame_bytes:
            raise ProtocolError("too_large", f"payload of {header.payload_nbytes(index)} bytes exceeds the "
                                f"limit {limits.max_frame_bytes}", header.acquisition_id, header.type)


def build_message(header: Header, arrays: list[np.ndarray], received_s: float | None = None) -> Message:
    """The message from a validated header and its payload arrays (already shaped; not copied)."""
    received_s = time.perf_counter() if received_s is None else received_s
    if len(arrays) not in expected_frame_counts(header):
        raise ProtocolError("frame_count", f"{header.type} takes {expected_frame_counts(header)} payload frames, "
                            f"got {len(arrays)}", header.acquisition_id, header.type)
    if header.type == "start":
        return Start(header.acquisition_id, header.fields["geometry"], header.fields["dtype"],
                     arrays[0] if arrays else None, received_s)
    if header.type == "stop":
        return Stop(header.acquisition_id, received_s)
    return Frame(header.type, header.acquisition_id, header.fields["polarization"], header.fields["view"],
                 arrays[0], received_s)


def payload_array(header: Header, index: int, buffer) -> np.ndarray:
    """View ``buffer`` (bytes-like of exactly the announced size) as the announced array."""
    shape, dtype = header.payload[index]
    size = memoryview(buffer).nbytes
    if size != header.payload_nbytes(index):
        raise ProtocolError("size_mismatch", f"payload frame {index} has {size} bytes, header announces "
                            f"{list(shape)} {dtype.name} = {header.payload_nbytes(index)} bytes",
                            header.acquisition_id, header.type)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class PayloadFrames:
    """Where :func:`receive_message` reads payload frames from: here a list of bytes-like frames (the
    in-process ``submit_frames`` and :func:`decode_message`); the ZeroMQ server gives its socket the
    same three methods, so both read the wire through one decoder."""

    def __init__(self, frames) -> None:
        self._frames = list(frames)
        self._next = 0

    def more(self) -> bool:
        return self._next < len(self._frames)

    def read_into(self, buffer: np.ndarray) -> int:
        """Copy the next frame into ``buffer`` if it has exactly its size; return the frame's size."""
        frame = memoryview(self._frames[self._next]).cast("B")
        self._next += 1
        if frame.nbytes == buffer.nbytes:
            buffer[:] = np.frombuffer(frame, dtype=np.uint8)
        return frame.nbytes

    def skip_rest(self) -> int:
        n = len(self._frames) - self._next
        self._next = len(self._frames)
        return n


def receive_message(header_frame, payloads, take, give, limits: Limits = DEFAULT_LIMITS,
                    received_s: float | None = None) -> tuple[Message, list]:
    """The one decoder of ingest messages from bytes: validate the header, then read each payload
    frame into a buffer from ``take(nbytes)`` (sizes are checked before anything is allocated), and
    build the typed message over those buffers. Returns the message and the buffers it lives in.
    On a :class:`ProtocolError` the rest of the message is skipped and the buffers go back through
    ``give`` before the error is raised."""
    received_s = time.perf_counter() if received_s is None else received_s
    buffers, arrays = [], []
    try:
        header = parse_header(header_frame, limits)
        allowed = expected_frame_counts(header)
        while payloads.more():
            index = len(arrays)
            if index >= max(allowed):
                extra = payloads.skip_rest()
                raise ProtocolError("frame_count", f"{header.type} takes at most {max(allowed)} payload "
                                    f"frame(s), got {index + extra}", header.acquisition_id, header.type)
            check_payload(header, index + 1, limits)   # the size limit, before allocating
            expected = header.payload_nbytes(index)
            buffer = take(expected)
            buffers.append(buffer)
            got = payloads.read_into(buffer)
            if got != expected:
                raise ProtocolError("size_mismatch", f"payload frame {index} has {got} bytes, header announces "
                                    f"{list(header.payload[index][0])} {header.payload[index][1].name} = "
                                    f"{expected} bytes", header.acquisition_id, header.type)
            shape, dtype = header.payload[index]
            arrays.append(buffer.view(dtype).reshape(shape))
        check_payload(header, len(arrays), limits)
        return build_message(header, arrays, received_s), buffers
    except BaseException:
        payloads.skip_rest()
        for buffer in buffers:
            give(buffer)
        raise


def decode_message(frames, limits: Limits = DEFAULT_LIMITS, received_s: float | None = None) -> Message:
    """Validate and decode a whole multipart message (a list of bytes-like frames) through
    :func:`receive_message`; payload arrays are copies in new buffers."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("malformed", "a message needs at least a header frame")
    message, _ = receive_message(frames[0], PayloadFrames(frames[1:]), lambda n: np.empty(n, np.uint8),
                                 lambda buffer: None, limits, received_s)
    return message


def start_message(acquisition_id: str, geometry: Geometry, dtype, background=None,
                  limits: Limits = DEFAULT_LIMITS) -> Start:
    """A typed ``start`` from Python values (the in-process API), checked against the same limits as
    a ``start`` header from the wire, without encoding it: ``acquisition_id``, views, frame side,
    volume size, dtype, and the inline background's size."""
    message_type = "start"
    acquisition_id = _acquisition_id({"acquisition_id": acquisition_id}, message_type, limits)
    dtype = np.dtype(dtype)
    if dtype.name not in WIRE_DTYPES:
        raise ProtocolError("invalid_field", f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype}",
                            acquisition_id, message_type)
    if not isinstance(geometry, Geometry):
        raise ProtocolError("invalid_field", "geometry must be a biref_sdk.geometry.Geometry", acquisition_id,
                            message_type)
    if geometry.n_views > limits.max_views:
        raise ProtocolError("too_large", f"{geometry.n_views} illuminations exceed the limit {limits.max_views}",
                            acquisition_id, message_type)
    if max(geometry.hologram_shape) > limits.max_hologram_side:
        raise ProtocolError("too_large", f"frames {list(geometry.hologram_shape)} exceed the side limit "
                            f"{limits.max_hologram_side}", acquisition_id, message_type)
    if math.prod(geometry.volume_shape) > limits.max_volume_voxels:
        raise ProtocolError("too_large", f"volume {list(geometry.volume_shape)} exceeds {limits.max_volume_voxels} "
                            "voxels", acquisition_id, message_type)
    wire = WIRE_DTYPES[dtype.name]
    if background is not None:
        expected = (2, geometry.n_views, *geometry.hologram_shape)
        if tuple(np.shape(background)) != expected:
            raise ProtocolError("shape_mismatch", f"background {list(np.shape(background))}, expected {list(expected)}",
                                acquisition_id, message_type)
        nbytes = math.prod(expected) * wire.itemsize
        if nbytes > limits.max_frame_bytes:
            raise ProtocolError("too_large", f"payload of {nbytes} bytes exceeds the limit {limits.max_frame_bytes}",
                                acquisition_id, message_type)
    return Start(acquisition_id, geometry, wire, background)


# -- encoding (microscope side) --------------------------------------------------------------------
def _wire_array(array, dtype=None) -> np.ndarray:
    """``array`` as a C-ordered little-endian array of a wire dtype; integer conversions are
    range-checked, float-to-integer conversions refused (they would silently truncate)."""
    array = np.asarray(array)
    dtype = np.dtype(dtype or array.dtype)
    if dtype.name not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} cannot travel; use one of {', '.join(WIRE_DTYPES)}")
    wire = WIRE_DTYPES[dtype.name]
    if array.dtype.name != wire.name:
        if array.dtype.kind in "iub" and wire.kind == "u":
            info = np.iinfo(wire)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(f"values outside the range of {wire.name}")
        elif not (array.dtype.kind in "iubf" and wire.kind == "f"):
            raise ValueError(f"frames of dtype {array.dtype} cannot be sent as {wire.name}")
    return np.ascontiguousarray(array, dtype=wire)


def _pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def encode_start(acquisition_id: str, geometry: Geometry, dtype="uint16", background=None) -> list:
    """Frames of a ``start`` message; ``background`` [2, V, H, W] is sent inline if given."""
    dtype = np.dtype(dtype)
    attrs = geometry.to_attributes()
    header = {
        "protocol": PROTOCOL, "type": "start", "acquisition_id": acquisition_id,
        "geometry": {name: (np.asarray(attrs[name]).tolist() if np.ndim(attrs[name]) else float(attrs[name]))
                     for name in GEOMETRY_ATTRIBUTES},
        "shape": list(geometry.hologram_shape), "dtype": WIRE_DTYPES[dtype.name].name, "n_views": geometry.n_views,
    }
    frames = [_pack(header)]
    if background is not None:
        expected = (2, geometry.n_views, *geometry.hologram_shape)
        if np.shape(background) != expected:
            raise ValueError(f"background shape {np.shape(background)} != {expected}")
        frames.append(_wire_array(background, dtype))
    return frames


def encode_frame(message_type: str, acquisition_id: str, polarization: int, view: int, frame, dtype=None) -> list:
    """Frames of a ``view`` or ``background`` message; ``frame`` [H, W]."""
    if message_type not in ("view", "background"):
        raise ValueError(f"message_type must be 'view' or 'background', got {message_type!r}")
    array = _wire_array(frame, dtype)
    if array.ndim != 2:
        raise ValueError(f"a frame must be 2-D [H, W], got shape {array.shape}")
    header = {"protocol": PROTOCOL, "type": message_type, "acquisition_id": acquisition_id,
              "polarization": int(polarization), "view": int(view), "shape": list(array.shape),
              "dtype": array.dtype.name}
    return [_pack(header), array]


def encode_stop(acquisition_id: str) -> list:
    return [_pack({"protocol": PROTOCOL, "type": "stop", "acquisition_id": acquisition_id})]


# -- results (SDK -> subscribers) ------------------------------------------------------------------
VOLUME_ARRAYS = ("ne", "no", "director")
TRUST_ARRAYS = ("uncertainty",)  # biref/2: after the volume's arrays when the engine gives them


def encode_result(topic: str, header: dict, volume=None) -> list:
    """Frames of a result message: the topic (for SUB prefix filtering), the msgpack header, and for
    ``volume``/``preview`` the float32 arrays ne [Z,Y,X], no [Z,Y,X], director [3,Z,Y,X], then
    uncertainty [3,Z,Y,X] if the volume has one; its consistency goes in the header."""
    if topic not in TOPICS:
        raise ValueError(f"topic must be one of {TOPICS}")
    header = {"protocol": PROTOCOL, "type": topic, **header}
    frames = [topic.encode(), None]
    if topic in ("volume", "preview"):
        names = VOLUME_ARRAYS + (TRUST_ARRAYS if volume.uncertainty is not None else ())
        header.update(shape=list(volume.shape), dtype="float32", arrays=list(names),
                      voxel_size_m=list(volume.voxel_size_m), medium_index=volume.medium_index,
                      parameters=json.dumps(volume.parameters, default=_json_default),
                      consistency=None if volume.consistency is None else volume.consistency.to_dict())
        frames += [np.ascontiguousarray(getattr(volume, name), dtype="<f4") for name in names]
    frames[1] = _pack(header)
    return frames


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclass(frozen=True)
class Result:
    """A decoded result message. ``volume`` is set for ``volume`` and ``preview``."""

    topic: str
    header: dict
    volume: object | None = None
    received_s: float = field(default_factory=time.perf_counter, compare=False)

    @property
    def acquisition_id(self) -> str | None:
        return self.header.get("acquisition_id")


def decode_result(frames, limits: Limits = DEFAULT_LIMITS) -> Result:
    """Validate and decode a result message (subscriber side); arrays are copied out of the frames."""
    from ..files import Consistency, FileFormatError, Volume

    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        raise ProtocolError("malformed", "a result needs a topic frame and a header frame")
    topic = bytes(frames[0]).decode("ascii", "replace")
    if topic not in TOPICS:
        raise ProtocolError("unknown_type", f"unknown topic {topic[:40]!r}")
    header = _unpack(frames[1], limits, "result header")
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "result header must be a msgpack map")
    if header.get("protocol") not in ACCEPTED_PROTOCOLS:
        raise ProtocolError("unsupported_protocol", f"protocol must be one of {', '.join(ACCEPTED_PROTOCOLS)}")
    if header.get("type") != topic:
        raise ProtocolError("invalid_field", f"header type {_show(header.get('type'))} != topic {topic!r}")
    if topic not in ("volume", "preview"):
        if len(frames) != 2:
            raise ProtocolError("frame_count", f"{topic} takes no payload frames")
        return Result(topic, header)
    f = _Fields(header, topic, header.get("acquisition_id") if isinstance(header.get("acquisition_id"), str) else None)
    shape = f.shape("shape", 3, limits.max_volume_voxels)
    if math.prod(shape) > limits.max_volume_voxels:
        f.fail(f"volume {list(shape)} exceeds {limits.max_volume_voxels} voxels", "too_large")
    names = tuple(header["arrays"]) if isinstance(header.get("arrays"), list) else ()
    if header.get("dtype") != "float32" or names not in (VOLUME_ARRAYS, VOLUME_ARRAYS + TRUST_ARRAYS):
        f.fail(f"volume arrays must be {list(VOLUME_ARRAYS)}, optionally followed by {list(TRUST_ARRAYS)}, float32")
    if len(frames) != 2 + len(names):
        raise ProtocolError("frame_count", f"{topic} takes {len(names)} payload frames, got {len(frames) - 2}")
    shapes = {"ne": shape, "no": shape, "director": (3, *shape), "uncertainty": (3, *shape)}
    arrays = {}
    for name, frame in zip(names, frames[2:]):
        nbytes = math.prod(shapes[name]) * 4
        if memoryview(frame).nbytes != nbytes:
            raise ProtocolError("size_mismatch", f"{name}: {memoryview(frame).nbytes} bytes, expected {nbytes}",
                                f.acquisition_id, topic)
        arrays[name] = np.frombuffer(frame, dtype="<f4").reshape(shapes[name]).copy()
    try:
        parameters = json.loads(header.get("parameters", "{}"))
        consistency = header.get("consistency")
        volume = Volume(voxel_size_m=header["voxel_size_m"], medium_index=header["medium_index"],
                        parameters=parameters if isinstance(parameters, dict) else {},
                        consistency=None if consistency is None else Consistency.from_dict(consistency), **arrays)
    except (KeyError, TypeError, ValueError, AttributeError, FileFormatError) as error:
        f.fail(f"volume header unusable: {error}")
    return Result(topic, header, volume)
