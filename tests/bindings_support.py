"""Shared by the binding tests (test_bindings_c/flat/cpp/fuzz): the tools they need, found or
skipped with the reason, and one CMake build and install of bindings/c per test session."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
