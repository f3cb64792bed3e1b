"""biref/2's trust data in the C subscriber (bindings/c): the uncertainty frame and the consistency
score of volume results, and biref/1 results that still decode; through the flat entry points
(ctypes), through a C program on biref_result's fields, and through the subscriber over ZeroMQ.
The messages are packed here by hand with msgpack (bindings_support.volume_message) after
docs/protocol.md, so these tests need the C library only, not the Python SDK's encoder."""
from __future__ import annotations

import ctypes as C
import math
import time

import msgpack
import numpy as np
import pytest
import zmq

from bindings_support import (ABSENT, DEADLINE_S, c_library, compiler, decode, flat_library,  # noqa: F401 (fixture)
                              run, volume_message)

OK, EINVAL, ETIMEOUT, EPROTO, ENOTFOUND = 0, -1, -4, -5, -6
P = C.c_void_p
SHAPE = (2, 3, 4)
VOXELS = 24
CHECK = {"score": 0.1875, "noise_floor": 0.0625, "views_checked": 3, "time_s": 0.5,
         "residual": [[0.125, None, 0.25, 0.1875], [None, None, None, None]]}


@pytest.fixture(scope="module")
def lib(c_library):
    return flat_library(c_library.shared)


def _consistency(lib, result) -> tuple[float, int]:
    score, views = C.c_double(), C.c_int64()
    assert lib.biref_result_consistency(result, C.byref(score), C.byref(views)) == OK
    return score.value, views.value


def _volume(lib, result) -> dict:
    arrays = {"ne": np.empty(SHAPE, np.float32), "no": np.empty(SHAPE, np.float32),
              "director": np.empty((3, *SHAPE), np.float32)}
    assert lib.biref_result_copy_volume(result, *[a.ctypes.data_as(P) for a in arrays.values()], VOXELS) == OK
    uncertainty = np.empty((3, *SHAPE), np.float32)
    status = lib.biref_result_copy_uncertainty(result, uncertainty.ctypes.data_as(P), VOXELS)
    assert status in (OK, ENOTFOUND)
    if status == OK:
        arrays["uncertainty"] = uncertainty
    return arrays


def _same(decoded: dict, sent: dict) -> None:
    assert list(decoded) == list(sent)
    for name, array in sent.items():
        np.testing.assert_array_equal(decoded[name], array, err_msg=name)


@pytest.mark.parametrize("consistency, expected", [
    (CHECK, (0.1875, 3)),
    ({"score": 1, "views_checked": 2, "residual": [[1.0, None], [None, None]]}, (1.0, 2)),   # an integer score
    ({"score": 0.5, "views_checked": 1, "time_s": "later", "extra": {"x": [1]}}, (0.5, 1)),  # other keys ignored
    (None, (math.nan, 0)),     # nil: the check is off
    (ABSENT, (math.nan, 0)),
])
def test_biref2_volume_with_uncertainty_and_consistency(lib, consistency, expected):
    frames, sent = volume_message("biref/2", SHAPE, uncertainty=True, consistency=consistency)
    assert len(frames) == 6
    status, result = decode(lib, frames)
    try:
        assert status == OK
        score, views = _consistency(lib, result)
        assert views == expected[1] and (score == expected[0] or math.isnan(score) and math.isnan(expected[0]))
        assert lib.biref_result_consistency(result, None, None) == OK
        _same(_volume(lib, result), sent)
        out = np.empty((3, *SHAPE), np.float32)
        assert lib.biref_result_copy_uncertainty(result, out.ctypes.data_as(P), VOXELS - 1) == EINVAL
        assert lib.biref_result_copy_uncertainty(result, None, VOXELS) == EINVAL
    finally:
        lib.biref_result_delete(result)


@pytest.mark.parametrize("protocol, topic", [("biref/1", "volume"), ("biref/1", "preview"), ("biref/2", "volume")])
def test_volume_without_trust_data_decodes(lib, protocol, topic):
    """A biref/1 result (three arrays, no consistency key) and a biref/2 one from an engine
    without uncertainty: no uncertainty (ENOTFOUND), no score (NaN)."""
    frames, sent = volume_message(protocol, SHAPE, uncertainty=False, topic=topic)
    assert len(frames) == 5
    status, result = decode(lib, frames)
    try:
        assert status == OK
        score, views = _consistency(lib, result)
        assert math.isnan(score) and views == 0
        _same(_volume(lib, result), sent)
    finally:
        lib.biref_result_delete(result)


def _refused():
    four, _ = volume_message(uncertainty=True, consistency=CHECK)
    three, _ = volume_message(uncertainty=False)
    header = msgpack.unpackb(four[1])

    def with_header(frames, **changes):
        return [frames[0], msgpack.packb({**header, **changes}), *frames[2:]]

    return {
        "uncertainty frame 4 bytes short": [*four[:5], four[5][:-4]],
        "uncertainty frame 4 bytes long": [*four[:5], four[5] + b"\0" * 4],
        "uncertainty frame of one channel": [*four[:5], four[5][:VOXELS * 4]],
        "uncertainty announced, not sent": four[:5],
        "uncertainty sent, not announced": [*three, four[5]],
        "arrays out of order": with_header(four, arrays=["ne", "no", "uncertainty", "director"]),
        "an unknown fourth array": with_header(four, arrays=["ne", "no", "director", "sigma"]),
        "five arrays": [*with_header(four, arrays=["ne", "no", "director", "uncertainty", "uncertainty"]), four[5]],
        "score a string": with_header(four, consistency={**CHECK, "score": "low"}),
        "score nil": with_header(four, consistency={**CHECK, "score": None}),
        "score a bool": with_header(four, consistency={**CHECK, "score": True}),
        "views_checked negative": with_header(four, consistency={**CHECK, "views_checked": -1}),
        "views_checked a float": with_header(four, consistency={**CHECK, "views_checked": 1.5}),
        "consistency a list": with_header(four, consistency=[0.5]),
        "consistency a number": with_header(four, consistency=0.5),
        "protocol biref/3": with_header(four, protocol="biref/3"),
    }


@pytest.mark.parametrize("case", list(_refused()))
def test_malformed_trust_data_is_refused(lib, case):
    status, result = decode(lib, _refused()[case])
    try:
        assert status == EPROTO
        score, views = _consistency(lib, result)   # a refused message leaves an empty result
        assert math.isnan(score) and views == 0
        assert lib.biref_result_copy_uncertainty(result, None, 0) == EINVAL
    finally:
        lib.biref_result_delete(result)


def test_consistency_on_error_and_status_is_an_unknown_key(lib):
    for topic, fields in (("error", {"reason": "timeout", "fatal": False}), ("status", {"engine": "model"})):
        header = {"protocol": "biref/2", "type": topic, "seq": 1, "consistency": "ignored", **fields}
        status, result = decode(lib, [topic.encode(), msgpack.packb(header)])
        try:
            assert status == OK
            score, views = _consistency(lib, result)
            assert math.isnan(score) and views == 0
        finally:
            lib.biref_result_delete(result)


FIELDS_PROGRAM = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "biref.h"

/* decode argv[2] frames from files argv[1].0 ... and print biref_result's trust fields */
int main(int argc, char **argv)
{
    static char data[6][4096];
    const void *frames[6];
    size_t sizes[6];
    int n = argc == 3 ? atoi(argv[2]) : 0, status;
    biref_result r, *fresh = biref_result_new();
    if (fresh == NULL || !isnan(fresh->consistency_score) || fresh->uncertainty != NULL)
        return 2;
    biref_result_delete(fresh);
    for (int i = 0; i < n; i++) {
        char name[512];
        FILE *f;
        snprintf(name, sizeof name, "%s.%d", argv[1], i);
        if ((f = fopen(name, "rb")) == NULL)
            return 3;
        sizes[i] = fread(data[i], 1, sizeof data[i], f);
        frames[i] = data[i];
        fclose(f);
    }
    status = biref_result_decode(&r, frames, sizes, n);
    printf("status %d\n", status);
    if (status == BIREF_OK) {
        printf("score %.17g views %lld\n", r.consistency_score, (long long)r.consistency_views);
        size_t last = 3 * (size_t)r.shape[0] * r.shape[1] * r.shape[2] - 1;
        if (r.uncertainty != NULL)
            printf("uncertainty %.9g %.9g\n", r.uncertainty[0], r.uncertainty[last]);
        else
            printf("uncertainty none\n");
        biref_result_free(&r);
    }
    return 0;
}
"""


def test_result_fields_in_c(c_library, tmp_path):
    """biref_result's new fields read by a C program built against the installed header and library."""
    source = tmp_path / "fields.c"
    source.write_text(FIELDS_PROGRAM)
    lib_dir = c_library.prefix / "lib"
    run([compiler(), "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{c_library.prefix / 'include'}",
         source, f"-L{lib_dir}", "-lbiref_c", f"-Wl,-rpath,{lib_dir}", "-o", tmp_path / "fields"])
    trusted, sent = volume_message("biref/2", SHAPE, uncertainty=True, consistency=CHECK)
    old, _ = volume_message("biref/1", SHAPE, uncertainty=False)
    short = [*trusted[:5], trusted[5][:-4]]
    u = sent["uncertainty"].ravel()
    for name, frames, expected in (
            ("trusted", trusted, ["status 0", "score 0.1875 views 3", f"uncertainty {u[0]:.9g} {u[-1]:.9g}"]),
            ("old", old, ["status 0", "score nan views 0", "uncertainty none"]),
            ("short", short, [f"status {EPROTO}"])):
        for i, frame in enumerate(frames):
            (tmp_path / f"{name}.{i}").write_bytes(frame)
        done = run([tmp_path / "fields", tmp_path / name, len(frames)])
        assert done.stdout.splitlines() == expected, name


def test_subscriber_receives_six_frames_and_drops_seven(lib):
    """biref_subscriber_recv over ZeroMQ: the 6-frame biref/2 volume arrives whole; a message with
    a seventh frame and one with a short uncertainty frame are dropped and counted."""
    trusted, sent = volume_message("biref/2", SHAPE, uncertainty=True, consistency=CHECK)
    old, old_sent = volume_message("biref/1", SHAPE, uncertainty=False, seed=1)
    with zmq.Context() as context, context.socket(zmq.PUB) as pub:
        pub.linger = 0
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        subscriber = P()
        assert lib.biref_subscriber_open(C.byref(subscriber), None, f"tcp://127.0.0.1:{port}".encode(), None) == OK
        result = lib.biref_result_new()
        try:
            deadline = time.monotonic() + DEADLINE_S
            while True:   # PUB/SUB drops what is published before the subscription is live
                pub.send_multipart(trusted)
                status = lib.biref_subscriber_recv(subscriber, result, 100)
                if status == OK or time.monotonic() > deadline:
                    break
                assert status == ETIMEOUT
            assert status == OK and _consistency(lib, result) == (0.1875, 3)
            _same(_volume(lib, result), sent)
            lib.biref_result_free(result)
            while lib.biref_subscriber_recv(subscriber, result, 300) == OK:   # copies still in flight
                lib.biref_result_free(result)
            assert lib.biref_subscriber_rejected(subscriber) == 0
            pub.send_multipart([*trusted, b"\0" * 4])
            pub.send_multipart([*trusted[:5], trusted[5][:-4]])
            pub.send_multipart(old)
            assert lib.biref_subscriber_recv(subscriber, result, int(DEADLINE_S * 1000)) == OK
            score, views = _consistency(lib, result)
            assert math.isnan(score) and views == 0
            _same(_volume(lib, result), old_sent)
            assert lib.biref_subscriber_rejected(subscriber) == 2
            # a timeout leaves an empty result: no volume, no score
            assert lib.biref_subscriber_recv(subscriber, result, 10) == ETIMEOUT
            assert math.isnan(_consistency(lib, result)[0])
        finally:
            lib.biref_result_delete(result)
            lib.biref_subscriber_close(subscriber)
