"""The libFuzzer target of the C subscriber's result decoding (bindings/c/fuzz/fuzz_result.c),
built with clang -fsanitize=fuzzer,address,undefined against msgpack-c and run for a bounded time
(BIREF_FUZZ_SECONDS, default 60) from a seed corpus of real result messages: it must end clean (no
crash, leak, undefined behaviour, timeout or memory over 2 GB). Skips, saying why, without clang's
libFuzzer or msgpack-c's development files."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from bindings_support import C_DIR, DEBIAN_PACKAGES, pkg_flags, volume_message
from test_bindings_flat import _messages

FUZZ_SECONDS = int(os.environ.get("BIREF_FUZZ_SECONDS", "60"))


def fuzz_input(frames) -> bytes:
    """A message in the target's input form: frame count - 1, then each frame but the last as a
    2-byte little-endian length and its bytes, then the last frame."""
    blobs = [bytes(memoryview(f).cast("B")) for f in frames]
    return bytes([len(blobs) - 1]) + b"".join(len(b).to_bytes(2, "little") + b for b in blobs[:-1]) + blobs[-1]


def seed_messages() -> list:
    """Real messages of the service (volume, error, status), a biref/2 volume with all 6 frames
    (uncertainty, consistency) and a biref/1 one, packed by hand."""
    _, messages = _messages()
    consistency = {"score": 0.25, "noise_floor": 0.125, "views_checked": 2, "time_s": 0.5,
                   "residual": [[0.25, None], [0.5, None]]}
    return messages + [volume_message("biref/2", uncertainty=True, consistency=consistency)[0],
                       volume_message("biref/1", uncertainty=False)[0]]


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    clang = shutil.which(os.environ.get("BIREF_FUZZ_CC", "clang"))
    if clang is None:
        pytest.skip(f"clang is not installed, so no libFuzzer (Debian: apt-get install {DEBIAN_PACKAGES})")
    msgpack = pkg_flags("msgpack-c", "msgpack")
    if msgpack is None:
        pytest.skip(f"no msgpack-c development files (Debian: apt-get install {DEBIAN_PACKAGES})")
    program = tmp_path_factory.mktemp("fuzz") / "fuzz_result"
    built = subprocess.run([clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                            "-fno-sanitize-recover=undefined", f"-I{C_DIR / 'include'}", *msgpack[0],
                            str(C_DIR / "fuzz" / "fuzz_result.c"), str(C_DIR / "src" / "biref_result.c"),
                            str(C_DIR / "src" / "biref_encode.c"), *msgpack[1], "-o", str(program)],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "fuzzer" in built.stderr and "cannot find" in built.stderr:
        pytest.skip(f"this clang has no libFuzzer runtime: {built.stderr.strip().splitlines()[0]}")
    assert built.returncode == 0, built.stderr
    return program


def test_seed_messages_decode(fuzzer, tmp_path):
    """The seeds are messages the target decodes (so the fuzzer starts from the accepting paths)."""
    for i, frames in enumerate(seed_messages()):
        (tmp_path / f"seed{i}").write_bytes(fuzz_input(frames))
    done = subprocess.run([str(fuzzer), *sorted(map(str, tmp_path.iterdir()))], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_result_decoding_survives_fuzzing(fuzzer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, frames in enumerate(seed_messages()):
        (corpus / f"seed{i}").write_bytes(fuzz_input(frames))
    done = subprocess.run([str(fuzzer), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=2048", "-timeout=10",
                           "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(corpus)],
                          capture_output=True, text=True, timeout=FUZZ_SECONDS + 120)
    runs = re.search(r"Done (\d+) runs in (\d+) second", done.stderr)
    assert done.returncode == 0 and runs, done.stderr[-4000:]
    assert not list(tmp_path.glob("crash-*")) + list(tmp_path.glob("leak-*")) + list(tmp_path.glob("oom-*"))
    assert int(runs.group(1)) > 1000   # it really ran
    print(f"fuzz_result: {runs.group(1)} executions in {runs.group(2)} s")
