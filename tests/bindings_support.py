"""Shared by the binding tests (test_bindings_c/flat/cpp/fuzz/trust): the tools they need, found or
skipped with the reason, one CMake build and install of bindings/c per test session, and result
messages packed by hand with msgpack (independent of biref_sdk.streaming.protocol)."""
from __future__ import annotations

import ctypes as C
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest

BINDINGS = Path(__file__).resolve().parent.parent / "bindings"
C_DIR = BINDINGS / "c"
DEADLINE_S = 180.0   # builds and the formula engine share two busy cores with everything else
# what to install so that these tests run (Debian/Ubuntu names; README, CONTRIBUTING, .ci/run)
DEBIAN_PACKAGES = "cmake pkg-config g++ libzmq3-dev libmsgpack-dev clang"


def compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def pkg_flags(*modules: str) -> tuple[list[str], list[str]] | None:
    """(compile flags, link flags) of the first pkg-config module found among `modules`."""
    if shutil.which("pkg-config") is None:
        return None
    for module in modules:
        found = subprocess.run(["pkg-config", "--cflags", "--libs", module], capture_output=True, text=True)
        if found.returncode == 0:
            flags = found.stdout.split()
            libs = [f for f in flags if f.startswith(("-l", "-L"))]
            return [f for f in flags if f not in libs], libs
    return None


def dependency_flags() -> tuple[list[str], list[str]]:
    """Flags of libzmq and msgpack-c, or a skip naming what is missing."""
    if shutil.which("pkg-config") is None:
        pytest.skip(f"pkg-config is not installed (Debian: apt-get install {DEBIAN_PACKAGES})")
    zmq, msgpack = pkg_flags("libzmq"), pkg_flags("msgpack-c", "msgpack")
    missing = [name for name, flags in (("libzmq3-dev", zmq), ("libmsgpack-dev", msgpack)) if flags is None]
    if missing:
        pytest.skip(f"no development files of {' and '.join(missing)} (pkg-config does not know them; "
                    f"Debian: apt-get install {DEBIAN_PACKAGES})")
    return zmq[0] + msgpack[0], zmq[1] + msgpack[1]


@dataclass(frozen=True)
class Library:
    build: Path      # the CMake build tree (stream_acquisition, libbiref_c.so)
    prefix: Path     # where it was installed (include/, lib/, lib/cmake/biref_c, lib/pkgconfig)
    shared: Path     # the shared library


def run(command, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=DEADLINE_S, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def c_library(tmp_path_factory) -> Library:
    """bindings/c built with CMake (shared and static libraries, example) and installed."""
    cc = compiler()
    if cc is None:
        pytest.skip(f"no C compiler (Debian: apt-get install {DEBIAN_PACKAGES})")
    if shutil.which("cmake") is None:
        pytest.skip(f"cmake is not installed (Debian: apt-get install {DEBIAN_PACKAGES})")
    dependency_flags()
    root = tmp_path_factory.mktemp("biref_c")
    build, prefix = root / "build", root / "prefix"
    run(["cmake", "-S", C_DIR, "-B", build, f"-DCMAKE_C_COMPILER={cc}", "-DCMAKE_BUILD_TYPE=Release",
         "-DCMAKE_INSTALL_LIBDIR=lib"])
    run(["cmake", "--build", build, "-j", "2"])
    run(["cmake", "--install", build, "--prefix", prefix])
    return Library(build, prefix, build / "libbiref_c.so")


def flat_library(shared: Path) -> C.CDLL:
    """The shared library through ctypes, as LabVIEW's CLFN and C# P/Invoke call it (LABVIEW.md)."""
    lib = C.CDLL(str(shared))
    P = C.c_void_p
    lib.biref_version.restype = C.c_char_p
    lib.biref_result_new.restype = P
    lib.biref_result_delete.argtypes = [P]
    lib.biref_result_free.argtypes = [P]
    lib.biref_result_decode.argtypes = [P, C.POINTER(P), C.POINTER(C.c_size_t), C.c_int]
    lib.biref_result_text.argtypes = [P, C.c_char_p, C.c_char_p, C.c_int32]
    lib.biref_result_numbers.argtypes = [P, *([P] * 7)]
    lib.biref_result_copy_volume.argtypes = [P, P, P, P, C.c_uint64]
    lib.biref_result_copy_uncertainty.argtypes = [P, P, C.c_uint64]
    lib.biref_result_consistency.argtypes = [P, P, P]
    lib.biref_producer_open.argtypes = [C.POINTER(P), P, C.c_char_p, C.c_int]
    lib.biref_producer_start_flat.argtypes = [P, C.c_char_p, C.c_double, C.c_double, C.c_double, C.c_double,
                                              C.c_uint32, P, P, P, P, C.c_uint32, C.c_uint32, C.c_int32, P]
    lib.biref_producer_frame_flat.argtypes = [P, C.c_int32, C.c_char_p, C.c_int32, C.c_uint32, C.c_uint32,
                                              C.c_uint32, C.c_int32, P]
    lib.biref_producer_stop.argtypes = [P, C.c_char_p]
    lib.biref_producer_close.argtypes = [P, C.c_int]
    lib.biref_subscriber_open.argtypes = [C.POINTER(P), P, C.c_char_p, P]
    lib.biref_subscriber_recv.argtypes = [P, P, C.c_int]
    lib.biref_subscriber_rejected.argtypes = [P]
    lib.biref_subscriber_rejected.restype = C.c_uint64
    lib.biref_subscriber_close.argtypes = [P]
    return lib


def decode(lib: C.CDLL, frames) -> tuple[int, int]:
    """(status, result handle) of biref_result_decode on these frames; delete the handle after."""
    blobs = [bytes(memoryview(f).cast("B")) for f in frames]
    buffers = [C.create_string_buffer(b, len(b)) for b in blobs]
    pointers = (C.c_void_p * len(blobs))(*[C.cast(b, C.c_void_p) for b in buffers])
    sizes = (C.c_size_t * len(blobs))(*[len(b) for b in blobs])
    result = lib.biref_result_new()
    return lib.biref_result_decode(result, pointers, sizes, len(blobs)), result


ABSENT = object()   # a header key left out (None packs as nil)


def volume_message(protocol: str = "biref/2", shape: tuple[int, int, int] = (2, 3, 4), uncertainty: bool = True,
                   consistency=ABSENT, topic: str = "volume", seed: int = 0, **header) -> tuple[list[bytes], dict]:
    """A volume (or preview) result message as docs/protocol.md lays it out, packed here by hand:
    (frames, the arrays sent by name). `consistency` goes into the header as given (absent if
    ABSENT); `uncertainty` announces and sends the biref/2 frame; `header` adds or replaces keys."""
    rng = np.random.default_rng(seed)
    arrays = {"ne": rng.random(shape, np.float32) + 1.5, "no": rng.random(shape, np.float32) + 1.5,
              "director": rng.random((3, *shape), np.float32)}
    if uncertainty:
        arrays["uncertainty"] = rng.random((3, *shape), np.float32) * 0.01
    fields = {"protocol": protocol, "type": topic, "seq": 11, "time_unix_s": 1.0, "acquisition_id": "hand-µ",
              "complete": True, "views_used": 8, "views_expected": 8, "missing": [], "incomplete_reason": None,
              "latency_s": 0.25, "engine": "model", "sdk_version": "0", "shape": list(shape), "dtype": "float32",
              "arrays": list(arrays), "voxel_size_m": [1e-7, 5e-8, 5e-8], "medium_index": 1.54, "parameters": "{}"}
    if consistency is not ABSENT:
        fields["consistency"] = consistency
    fields.update(header)
    frames = [topic.encode(), msgpack.packb(fields)] + [a.astype("<f4").tobytes() for a in arrays.values()]
    return frames, arrays
