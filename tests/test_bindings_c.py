"""The C binding (bindings/c, on msgpack-c and libzmq): its producer's messages byte for byte those
of biref_sdk.streaming.protocol, an acquisition streamed from C through the service to the C
subscriber (the volume equal to the Python client's and to the offline reconstruction), and the
CMake build: shared library exporting only the public API, installed CMake package and pkg-config
file. Skips, saying why and what to install, where a tool or a development package is missing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from bindings_support import C_DIR, DEADLINE_S, c_library, compiler, dependency_flags, run  # noqa: F401 (fixture)
from biref_sdk.files import Volume, write_acquisition
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.streaming import protocol
from biref_sdk.streaming.client import Subscriber
from biref_sdk.streaming.microscope import SimulatedMicroscope
from biref_sdk.streaming.server import StreamingServer
from biref_sdk.streaming.service import ServiceConfig
from test_streaming_e2e import assert_same_volume
from test_streaming_support import ViewMeanReconstructor, random_acquisition, tiny_geometry

CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{C_DIR / 'include'}"]


@pytest.fixture(scope="module")
def stream_program(tmp_path_factory):
    """The example compiled with the library's sources, warnings as errors."""
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler: none of $CC, cc, gcc, clang is on PATH (Debian: apt-get install gcc)")
    cflags, libs = dependency_flags()
    program = tmp_path_factory.mktemp("bindings_c_stream") / "stream_acquisition"
    run([cc, *CFLAGS, *cflags, *sorted((C_DIR / "src").glob("*.c")), C_DIR / "examples" / "stream_acquisition.c",
         *libs, "-o", program])
    return program


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


def read_streamed_volume(prefix: Path, geometry) -> Volume:
    """The PREFIX_ne/no/director.raw files the C and C++ examples write (float32 little-endian)."""
    shape = geometry.volume_shape
    return Volume(*(np.fromfile(f"{prefix}_{name}.raw", dtype="<f4").reshape(s)
                    for name, s in (("ne", shape), ("no", shape), ("director", (3, *shape)))),
                  geometry.voxel_size_m, geometry.medium_index)


def assert_equals_python_client(streamed: Volume, python: Volume) -> None:
    """The same message decoded by both: bit for bit."""
    for name in ("ne", "no", "director"):
        np.testing.assert_array_equal(getattr(streamed, name), getattr(python, name), err_msg=name)


@pytest.mark.slow
def test_acquisition_streamed_from_c_equals_the_python_clients_and_the_offline_volume(stream_program, tmp_path):
    acquisition = SimulatedMicroscope("small", seed=0).acquisition(0)
    raw = _export(acquisition, tmp_path)
    with _serve(get_reconstructor("formula")) as server, Subscriber(server.results_address, ("volume",)) as python:
        python.wait_ready(DEADLINE_S)
        run = subprocess.run([str(stream_program), str(raw), "--ingest", server.ingest_address, "--results",
                              server.results_address, "--id", "from-c", "--timeout", str(DEADLINE_S), "--out",
                              str(tmp_path / "volume")], capture_output=True, text=True, timeout=2 * DEADLINE_S)
        assert run.returncode == 0, run.stderr
        python_volume = python.wait_volume("from-c", DEADLINE_S).volume
        status = server.status()
    assert "sent from-c: 74 views" in run.stdout
    assert "volume from-c: complete 1, 74/74 views, 32x64x64, engine formula" in run.stdout
    assert status["rejected_messages"] == 0 and status["volumes"] == 1
    streamed = read_streamed_volume(tmp_path / "volume", acquisition.geometry)
    assert_equals_python_client(streamed, python_volume)
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
def test_shared_library_exports_only_the_public_api(c_library):
    exported = run(["nm", "-D", "--defined-only", c_library.shared]).stdout.split()[2::3]
    declared = set(re.findall(r"BIREF_API [^;]*?\b(biref_\w+)\(", (C_DIR / "include" / "biref.h").read_text()))
    assert set(exported) == declared
    soname = run(["objdump", "-p", c_library.shared]).stdout
    assert re.search(r"SONAME\s+libbiref_c\.so\.3\b", soname)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["find_package", "pkg-config"])
def test_installed_library_is_found_by_cmake_and_pkg_config(c_library, tmp_path, how):
    """A consumer builds against the installed package only (not the source tree), links the shared
    library, and the version it reports at run time is the header's."""
    (tmp_path / "app.c").write_text(
        '#include <stdio.h>\n#include <string.h>\n#include <biref.h>\n'
        'int main(void) { printf("%s %d\\n", biref_version(), BIREF_VERSION_MAJOR);\n'
        '  return strcmp(biref_version(), BIREF_VERSION_STRING) != 0; }\n')
    if how == "find_package":
        (tmp_path / "CMakeLists.txt").write_text(
            "cmake_minimum_required(VERSION 3.16)\nproject(app C)\nfind_package(biref_c 3 REQUIRED)\n"
            "add_executable(app app.c)\ntarget_link_libraries(app PRIVATE biref_c::biref_c)\n")
        run(["cmake", "-S", tmp_path, "-B", tmp_path / "build", f"-DCMAKE_PREFIX_PATH={c_library.prefix}"])
        run(["cmake", "--build", tmp_path / "build"])
        app = tmp_path / "build" / "app"
    else:
        env = {**os.environ, "PKG_CONFIG_PATH": str(c_library.prefix / "lib" / "pkgconfig")}
        flags = run(["pkg-config", "--cflags", "--libs", "biref_c"], env=env).stdout.split()
        app = tmp_path / "app"
        run([compiler(), *CFLAGS[:-1], tmp_path / "app.c", *flags, f"-Wl,-rpath,{c_library.prefix / 'lib'}", "-o", app])
    done = subprocess.run([str(app)], capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "LD_LIBRARY_PATH": str(c_library.prefix / "lib")})
    assert done.returncode == 0 and done.stdout.split() == ["3.0.0", "3"], done.stdout + done.stderr


@pytest.mark.slow
def test_cmake_built_example_runs(c_library):
    usage = subprocess.run([str(c_library.build / "stream_acquisition")], capture_output=True, text=True,
                           timeout=DEADLINE_S)
    assert usage.returncode == 1 and "usage: stream_acquisition DIR" in usage.stderr
