"""The C binding (bindings/c): its msgpack codec against the reference msgpack package, its
producer's messages byte for byte those of biref_sdk.streaming.protocol, and an acquisition
streamed from C through the service to the C subscriber, the volume equal to the offline
reconstruction. Skips, saying why, where there is no C compiler or no libzmq development files."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from biref_sdk.files import Volume, write_acquisition
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.streaming import protocol
from biref_sdk.streaming.microscope import SimulatedMicroscope
from biref_sdk.streaming.server import StreamingServer
from biref_sdk.streaming.service import ServiceConfig
from test_streaming_e2e import assert_same_volume
from test_streaming_support import ViewMeanReconstructor, random_acquisition, tiny_geometry

C_DIR = Path(__file__).resolve().parent.parent / "bindings" / "c"
DEADLINE_S = 120.0   # the formula engine shares two busy cores with everything else
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{C_DIR / 'include'}"]


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _zmq_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of libzmq: from pkg-config when it knows libzmq, else -lzmq."""
    if shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq"], capture_output=True, text=True)
        if found.returncode == 0:
            flags = found.stdout.split()
            libs = [f for f in flags if f.startswith(("-l", "-L"))]
            return [f for f in flags if f not in libs], libs
    return [], ["-lzmq"]


def _compile(compiler: str, sources, output: Path, extra=(), libs=()) -> None:
    built = subprocess.run([compiler, *CFLAGS, *extra, *map(str, sources), *libs, "-o", str(output)],
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert built.returncode == 0, f"the C binding does not compile cleanly:\n{built.stderr}"


@pytest.fixture(scope="module")
def compiler():
    found = _compiler()
    if found is None:
        pytest.skip(f"no C compiler: {os.environ.get('CC') or 'none of cc, gcc, clang'} is not on PATH")
    return found


@pytest.fixture(scope="module")
def msgpack_check(compiler, tmp_path_factory):
    program = tmp_path_factory.mktemp("bindings_c") / "msgpack_check"
    _compile(compiler, [C_DIR / "src" / "biref_msgpack.c", C_DIR / "tests" / "msgpack_check.c"], program)
    return program


@pytest.fixture(scope="module")
def stream_program(compiler, tmp_path_factory):
    out = tmp_path_factory.mktemp("bindings_c_stream")
    cflags, libs = _zmq_flags()
    probe = out / "probe.c"
    probe.write_text("#include <zmq.h>\nint main(void) { int a, b, c; zmq_version(&a, &b, &c); return a < 4; }\n")
    found = subprocess.run([compiler, *cflags, str(probe), *libs, "-o", str(out / "probe")], capture_output=True,
                           text=True, timeout=DEADLINE_S)
    if found.returncode != 0 or subprocess.run([str(out / "probe")]).returncode != 0:
        reason = (found.stderr.strip().splitlines() or ["libzmq older than 4"])[0]
        pytest.skip(f"no libzmq development files (zmq.h and libzmq >= 4 to link; Debian: libzmq3-dev): {reason}")
    program = out / "stream_acquisition"
    _compile(compiler, [*sorted((C_DIR / "src").glob("*.c")), C_DIR / "examples" / "stream_acquisition.c"], program,
             cflags, libs)
    return program


# -- msgpack codec ---------------------------------------------------------------------------------
def _text(n: int) -> str:
    return "".join(chr(ord("a") + i % 26) for i in range(n))


COUNTS = (0, 15, 16, 65535, 65536)
# what `msgpack_check pack` writes, in its order (keep in step with pack_all in msgpack_check.c)
PACKED = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63,
    2**64 - 1,
    0.0, -0.0, 1.5, -2.25e-300, 5.32e-07, 1e308, 0.1,
    True, False, None,
    *(_text(n) for n in (0, 1, 31, 32, 255, 256, 65535, 65536)),
    "µm Ångström",
    *([k % 128 for k in range(n)] for n in COUNTS),
    *({f"k{k}": -k for k in range(n)} for n in COUNTS),
    {"a": [1, [2.5, {"b": None}]], "c": True},
]


def _records(data: bytes) -> list[bytes]:
    records, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "little")
        records.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return records


def test_msgpack_writer_writes_the_reference_packers_bytes(msgpack_check):
    packed = _records(subprocess.run([str(msgpack_check), "pack"], capture_output=True, check=True,
                                     timeout=DEADLINE_S).stdout)
    assert len(packed) == len(PACKED)
    for blob, value in zip(packed, PACKED):
        assert blob == msgpack.packb(value, use_bin_type=True), repr(value)[:60]
        decoded = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        assert decoded == value and type(decoded) is type(value)
        if isinstance(value, float):
            assert math.copysign(1.0, decoded) == math.copysign(1.0, value)   # -0.0 keeps its sign


def _from_dump(text: str):
    """The JSON of `msgpack_check dump` back to the values msgpack.unpackb gives."""
    def tagged(d):
        if "$float" in d:
            return float(d["$float"])
        if "$bin" in d:
            return bytes.fromhex(d["$bin"])
        if "$ext" in d:
            return msgpack.ExtType(d["$ext"][0], bytes.fromhex(d["$ext"][1]))
        return {key: value for key, value in d["$map"]}
    return json.loads(text, object_hook=tagged)


def _run(program, *args, data: bytes):
    return subprocess.run([str(program), *args], input=data, capture_output=True, timeout=DEADLINE_S)


def _result_headers() -> list[bytes]:
    shape = (2, 3, 4)
    volume = Volume(np.full(shape, 1.5, np.float32), np.full(shape, 1.5, np.float32), np.zeros((3, *shape), np.float32),
                    (1e-7, 5e-8, 5e-8), 1.54, {"method": "x", "streaming": {"complete": True}})
    header = {"seq": 7, "time_unix_s": time.time(), "acquisition_id": "µ-1", "complete": True, "views_used": 74,
              "views_expected": 74, "missing": [], "latency_s": 0.05, "engine": "formula", "incomplete_reason": None,
              "sdk_version": "0"}
    error = {"seq": 0, "time_unix_s": 1.0, "reason": "bad_geometry", "detail": "x" * 600, "acquisition_id": None,
             "message_type": "start", "polarization": None, "view": None, "fatal": True}
    status = {"seq": 3, "time_unix_s": 1.0, "engine": "formula", "errors": {"malformed": 2}, "queue_bytes": 2**40}
    return [protocol.encode_result("volume", header, volume)[1], protocol.encode_result("error", error)[1],
            protocol.encode_result("status", status)[1]]


def test_msgpack_reader_reads_what_the_reference_packer_writes(msgpack_check):
    blobs = [msgpack.packb(v, use_bin_type=True) for v in PACKED[::3]]
    blobs += [msgpack.packb(0.1, use_single_float=True), msgpack.packb(b"\x00\xff" * 300, use_bin_type=True),
              *(msgpack.packb(msgpack.ExtType(code, data)) for code, data in ((5, b"xyz"), (100, b"12345678"),
                                                                               (7, b"e" * 300))),
              msgpack.packb({1: "int key", "nested": {"deeper": [[[]]]}}), *_result_headers()]
    for blob in blobs:
        dumped = _run(msgpack_check, "dump", data=blob)
        assert dumped.returncode == 0, dumped.stdout
        assert _from_dump(dumped.stdout.decode()) == msgpack.unpackb(blob, raw=False, strict_map_key=False)


def test_msgpack_reader_refuses_malformed_input(msgpack_check):
    header = msgpack.packb({"a": [1, 2.5, "xyz", None, {"b": True}], "c": b"\x01\x02"}, use_bin_type=True)
    nested_ok, nested_deep = b"\x91" * 60 + b"\xc0", b"\x91" * 100 + b"\xc0"
    bad = [header[:n] for n in range(len(header))]                  # every truncation
    bad += [b"\xc1", header + b"\x00", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff\xa1k", b"\xdb\xff\xff\xff\xff",
            nested_deep]
    for blob in bad:
        dumped = _run(msgpack_check, "dump", data=blob)
        assert dumped.returncode == 1 and dumped.stdout.startswith(b"error "), blob[:20]
    assert _run(msgpack_check, "dump", data=nested_ok).returncode == 0


def _same(a, b) -> bool:
    """Equal values, NaN equal to NaN (mutated floats may be NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


def test_msgpack_reader_on_mutated_input_never_fails_where_the_reference_decodes(msgpack_check):
    """Random bytes flipped, inserted and cut in real headers: the C reader never crashes, and
    whatever the reference decoder reads, it reads the same (it may accept a bit more: it does not
    check UTF-8, nor refuse container keys)."""
    rng = np.random.default_rng(0)
    seeds = _result_headers() + [msgpack.packb(v, use_bin_type=True) for v in PACKED if len(repr(v)) < 200]
    cases = []
    for _ in range(3000):
        blob = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(len(blob) + 1))
            edit = rng.integers(3)
            if edit == 0 and at < len(blob):
                blob[at] = int(rng.integers(256))
            elif edit == 1:
                blob[at:at] = bytes(rng.integers(0, 256, rng.integers(1, 6), dtype=np.uint8))
            else:
                del blob[at:at + int(rng.integers(1, 9))]
        cases.append(bytes(blob))
    records = b"".join(len(c).to_bytes(4, "little") + c for c in cases)
    done = _run(msgpack_check, "dump-many", data=records)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split(b"\n")[:-1]
    assert len(lines) == len(cases)
    agreed = 0
    for case, line in zip(cases, lines):
        try:
            reference = msgpack.unpackb(case, raw=False, strict_map_key=False,
                                        ext_hook=lambda code, data: msgpack.ExtType(code, data))
        except Exception:  # the reference refuses it (any reason); the C reader may or may not
            continue
        if "Timestamp" in repr(reference):
            continue   # ext type -1 is decoded to a timestamp by the reference, kept raw by the C reader
        assert not line.startswith(b"error"), (case, line)
        assert _same(_from_dump(line.decode()), reference), (case, line)
        agreed += 1
    assert agreed > 300   # the mutations leave many valid messages, so both paths are exercised


def test_map_find_reads_one_key(msgpack_check):
    volume_header = _result_headers()[0]
    found = _run(msgpack_check, "find", "views_expected", data=volume_header)
    assert found.returncode == 0 and _from_dump(found.stdout.decode()) == 74
    found = _run(msgpack_check, "find", "arrays", data=volume_header)
    assert _from_dump(found.stdout.decode()) == ["ne", "no", "director"]
    missing = _run(msgpack_check, "find", "no_such_key", data=volume_header)
    assert missing.returncode == 1 and missing.stdout.strip() == b"error -6"   # BIREF_ENOTFOUND


# -- producer and subscriber over ZeroMQ -----------------------------------------------------------
def _export(acquisition, directory: Path) -> Path:
    write_acquisition(directory / "acquisition.h5", acquisition)
    subprocess.run([sys.executable, str(C_DIR / "examples" / "export_raw.py"), str(directory / "acquisition.h5"),
                    str(directory / "raw")], check=True, timeout=DEADLINE_S)
    return directory / "raw"


def _receive_all(socket, n_messages: int) -> list[list[bytes]]:
    messages, deadline = [], time.monotonic() + DEADLINE_S
    while len(messages) < n_messages:
        assert socket.poll(max(0, int((deadline - time.monotonic()) * 1000))), f"only {len(messages)} messages came"
        messages.append(socket.recv_multipart())
    assert not socket.poll(100), "more messages than the acquisition has"
    return messages


@pytest.mark.parametrize("background", ["inline", "messages"])
def test_c_producer_sends_the_reference_encoders_bytes(stream_program, tmp_path, background):
    acquisition = random_acquisition(tiny_geometry(), seed=3)
    raw = _export(acquisition, tmp_path)
    g, acquisition_id = acquisition.geometry, "c-bytes/ü"
    views = [(p, v) for p in range(2) for v in range(g.n_views)]
    expected = [protocol.encode_start(acquisition_id, g, "uint16",
                                      acquisition.background if background == "inline" else None)]
    if background == "messages":
        expected += [protocol.encode_frame("background", acquisition_id, p, v, acquisition.background[p, v])
                     for p, v in views]
    expected += [protocol.encode_frame("view", acquisition_id, p, v, acquisition.holograms[p, v]) for p, v in views]
    expected.append(protocol.encode_stop(acquisition_id))
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.linger = 0
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        sent = subprocess.run([str(stream_program), str(raw), "--ingest", f"tcp://127.0.0.1:{port}", "--results",
                               "none", "--id", acquisition_id, "--background", background, "--timeout",
                               str(DEADLINE_S)], capture_output=True, text=True, timeout=DEADLINE_S)
        assert sent.returncode == 0, sent.stderr
        received = _receive_all(pull, len(expected))
    for frames, reference in zip(received, expected):
        assert [bytes(f) for f in frames] == [bytes(memoryview(f).cast("B")) for f in reference]
        protocol.decode_message(frames)   # and it validates


def _serve(reconstructor):
    config = ServiceConfig(status_interval_s=0.1, acquisition_timeout_s=DEADLINE_S)
    return StreamingServer(reconstructor, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config)


@pytest.mark.slow
def test_acquisition_streamed_from_c_equals_the_offline_reconstruction(stream_program, tmp_path):
    acquisition = SimulatedMicroscope("small", seed=0).acquisition(0)
    raw = _export(acquisition, tmp_path)
    with _serve(get_reconstructor("formula")) as server:
        run = subprocess.run([str(stream_program), str(raw), "--ingest", server.ingest_address, "--results",
                              server.results_address, "--id", "from-c", "--timeout", str(DEADLINE_S), "--out",
                              str(tmp_path / "volume")], capture_output=True, text=True, timeout=2 * DEADLINE_S)
        status = server.status()
    assert run.returncode == 0, run.stderr
    assert "sent from-c: 74 views" in run.stdout
    assert "volume from-c: complete 1, 74/74 views, 32x64x64, engine formula" in run.stdout
    assert status["rejected_messages"] == 0 and status["volumes"] == 1
    shape = acquisition.geometry.volume_shape
    streamed = Volume(*(np.fromfile(tmp_path / f"volume_{name}.raw", dtype="<f4").reshape(s)
                        for name, s in (("ne", shape), ("no", shape), ("director", (3, *shape)))),
                      acquisition.geometry.voxel_size_m, acquisition.geometry.medium_index)
    assert_same_volume(streamed, get_reconstructor("formula").reconstruct(acquisition))


def test_fatal_error_reaches_the_c_subscriber(stream_program, tmp_path):
    raw = _export(random_acquisition(tiny_geometry(), seed=4), tmp_path)
    manifest = raw / "acquisition.txt"
    # an objective too weak for the illuminations: the service refuses the start (bad_geometry)
    manifest.write_text("\n".join("na_objective 0.1" if line.startswith("na_objective") else line
                                  for line in manifest.read_text().splitlines()) + "\n")
    with _serve(ViewMeanReconstructor()) as server:
        run = subprocess.run([str(stream_program), str(raw), "--ingest", server.ingest_address, "--results",
                              server.results_address, "--id", "refused", "--background", "messages", "--timeout",
                              str(DEADLINE_S)], capture_output=True, text=True, timeout=2 * DEADLINE_S)
        status = server.status()
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "error bad_geometry (fatal): geometry rejected" in run.stderr
    assert status["errors"]["bad_geometry"] == 1 and status["volumes"] == 0


@pytest.mark.slow
def test_cmake_build(compiler, stream_program, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    for command in (["cmake", "-S", str(C_DIR), "-B", str(build), f"-DCMAKE_C_COMPILER={compiler}"],
                    ["cmake", "--build", str(build)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_S)
        assert done.returncode == 0, done.stdout + done.stderr
    usage = subprocess.run([str(build / "stream_acquisition")], capture_output=True, text=True, timeout=DEADLINE_S)
    assert usage.returncode == 1 and "usage: stream_acquisition DIR" in usage.stderr
