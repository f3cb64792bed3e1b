"""The C++17 wrapper (bindings/cpp/biref.hpp): its checks without a service (errors, timeouts,
moves, views over a decoded volume), and its example streaming an acquisition through a real
`biref serve` on loopback, the volume bit for bit the Python client's and equal to the offline
reconstruction. Skips, saying why, without a C++ compiler or the C library's build tools."""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bindings_support import BINDINGS, DEADLINE_S, DEBIAN_PACKAGES, c_library, run, volume_message  # noqa: F401
from biref_sdk.reconstruction import get_reconstructor
from biref_sdk.streaming.client import Subscriber
from biref_sdk.streaming.microscope import SimulatedMicroscope
from test_bindings_c import _export, assert_equals_python_client, read_streamed_volume
from test_streaming_e2e import assert_same_volume

CXXFLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror"]


@pytest.fixture(scope="module")
def cxx_build(c_library, tmp_path_factory):
    cxx = (shutil.which(os.environ["CXX"]) if os.environ.get("CXX") else None) or shutil.which("c++") \
        or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip(f"no C++ compiler: none of $CXX, c++, g++, clang++ (Debian: apt-get install {DEBIAN_PACKAGES})")
    out = tmp_path_factory.mktemp("bindings_cpp")
    lib = c_library.prefix / "lib"

    def build(source: Path, name: str) -> Path:
        # only the installed package: biref.h and biref.hpp from include/, the shared library from lib/
        run([cxx, *CXXFLAGS, f"-I{c_library.prefix / 'include'}", source, f"-L{lib}",
             "-lbiref_c", f"-Wl,-rpath,{lib}", "-o", out / name])
        return out / name
    return build


def test_wrapper_errors_timeouts_moves_and_views(cxx_build, tmp_path):
    program = cxx_build(BINDINGS / "cpp" / "tests" / "wrapper_check.cpp", "wrapper_check")
    # packed by hand (bindings_support.volume_message): a biref/1 volume and a biref/2 one with its trust data
    shape = (4, 8, 8)
    check = {"score": 0.125, "noise_floor": 0.1, "views_checked": 4, "time_s": 0.01,
             "residual": [[0.25, 0.25, None], [0.25, 0.25, None]]}
    plain, _ = volume_message("biref/1", shape, uncertainty=False, acquisition_id="cpp-µ")
    trusted, _ = volume_message("biref/2", shape, uncertainty=True, consistency=check, acquisition_id="cpp-µ")
    for name, frames, expected in (("plain", plain, []), ("trusted", trusted, ["consistency", "0.125"])):
        for i, frame in enumerate(frames):
            (tmp_path / f"{name}.{i}").write_bytes(frame)
        done = subprocess.run([str(program), str(tmp_path / name)], capture_output=True, text=True,
                              timeout=DEADLINE_S)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.split() == expected + ["volume", "x".join(map(str, shape))]


class Serve:
    """`biref serve --method formula` on free loopback ports, as a vendor would run it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "biref_sdk", "serve", "--method", "formula", "--ingest", "tcp://127.0.0.1:0",
             "--results", "tcp://127.0.0.1:0", "--status-interval", "0.2", "--timeout", str(DEADLINE_S)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ingest = self.results = None
        deadline = time.monotonic() + DEADLINE_S
        seen = []
        while self.ingest is None or self.results is None:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise AssertionError(f"biref serve printed no addresses: {seen}") from None
            if line is None:
                raise AssertionError(f"biref serve ended: {seen}")
            seen.append(line)
            found = re.match(r"(ingest|results) (tcp://\S+)", line)
            if found:
                setattr(self, found.group(1), found.group(2))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.mark.slow
def test_cpp_example_through_biref_serve_equals_the_python_clients_volume(cxx_build, tmp_path):
    example = cxx_build(BINDINGS / "cpp" / "examples" / "stream_acquisition.cpp", "stream_acquisition_cpp")
    acquisition = SimulatedMicroscope("small", seed=0).acquisition(0)
    raw = _export(acquisition, tmp_path)
    serve = Serve()
    try:
        with Subscriber(serve.results, ("volume",)) as python:
            python.wait_ready(DEADLINE_S)
            done = subprocess.run([str(example), str(raw), "--ingest", serve.ingest, "--results", serve.results,
                                   "--id", "from-cpp", "--timeout", str(DEADLINE_S), "--out", str(tmp_path / "v")],
                                  capture_output=True, text=True, timeout=2 * DEADLINE_S)
            assert done.returncode == 0, done.stdout + done.stderr
            python_volume = python.wait_volume("from-cpp", DEADLINE_S).volume
    finally:
        serve.close()
    assert "sent from-cpp: 74 views" in done.stdout
    assert "volume from-cpp: complete 1, 74/74 views, 32x64x64, engine formula" in done.stdout
    streamed = read_streamed_volume(tmp_path / "v", acquisition.geometry)
    assert_equals_python_client(streamed, python_volume)
    assert_same_volume(streamed, get_reconstructor("formula").reconstruct(acquisition))
