"""The service under attack (issue 17): what an attacker with a raw pyzmq + msgpack client can send
must end in a counted rejection, within the stated memory budget, without stalling or dropping the
acquisitions of honest microscopes. Loopback only; every wait has a deadline; sizes are small."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.parse

import msgpack
import numpy as np
import pytest
import zmq

from biref_sdk.geometry import preset
from biref_sdk.streaming import protocol
from biref_sdk.streaming.client import Producer, Subscriber
from biref_sdk.streaming.protocol import Limits
from biref_sdk.streaming.security import CurveServer, generate_keys
from biref_sdk.streaming.server import StreamingServer, safe_filename
from biref_sdk.streaming.service import ServiceConfig, acquisition_footprint
from test_streaming_support import (DEADLINE_S, ViewMeanReconstructor, random_acquisition,
                                    tiny_geometry, wait_until)

ANY_PORT = "tcp://127.0.0.1:0"
FAST = ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S)


def _nested(depth: int):
    value = "biref/1"
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_header_values_are_counted_rejections_not_a_dead_thread(make_server, make_socket):
    server, collector = make_server()
    push = make_socket(zmq.PUSH, connect=server.ingest_address)
    cases = ["protocol", "type", "acquisition_id", "shape", "n_views", "dtype", "polarization"]
    for field in cases:
        header = {"protocol": "biref/1", "type": "start", "acquisition_id": "a", "shape": [32, 32],
                  "dtype": "uint16", "n_views": 3, "polarization": 0, field: _nested(1000)}
        data = msgpack.packb(header)
        assert len(data) < 1100
        push.send(data)
    wait_until(lambda: server.status()["rejected_messages"] == len(cases))
    assert server.service.alive and server._ingest_thread.is_alive()
    assert all(len(e.detail) < 200 for e in collector.errors)
    # honest traffic still goes through
    producer = Producer(server.ingest_address, timeout_s=DEADLINE_S)
    producer.send_acquisition(random_acquisition(tiny_geometry()), "honest")
    collector.wait_volume("honest")
    producer.close()


def test_an_exception_anywhere_in_decoding_costs_one_message(make_server, make_socket, monkeypatch):
    server, collector = make_server()

    def broken(*args, **kwargs):
        raise RecursionError("decoder bug")

    monkeypatch.setattr(protocol, "parse_header", broken)
    push = make_socket(zmq.PUSH, connect=server.ingest_address)
    push.send(b"\x80")
    collector.wait_error("internal_error")
    assert server._ingest_thread.is_alive() and server.status()["rejected_messages"] == 1


def test_a_start_inside_every_protocol_limit_but_beyond_the_memory_budget_is_too_large(make_service):
    service, collector = make_service()
    base = preset("small")
    huge = base.replace(illumination_sines=np.resize(base.sines, (1024, 2)), hologram_shape=(8192, 8192))
    assert service.submit_frames(protocol.encode_start("huge", huge, "float32"))
    error = collector.wait_error("too_large")
    assert error.fatal and "memory budget" in error.detail
    assert service.status()["errors"] == {"too_large": 1}


def test_n_views_beyond_the_limit_is_too_large():
    base = preset("small")
    geometry = base.replace(illumination_sines=np.resize(base.sines, (1025, 2)))
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_header(protocol.encode_start("x", geometry)[0])
    assert info.value.reason == "too_large"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident size is read from /proc (Linux)")
def test_resident_size_stays_within_the_budget_while_an_attacker_holds_acquisitions_open(make_server, make_socket):
    """24 acquisitions of 512 x 512 frames, each sent all its views and all but one background frame
    (so each holds its background accumulator and its waiting views, 14.7 MB, until it times out):
    353 MB without admission control; the budget is 160 MB."""
    queue_bytes, memory_bytes = 32 << 20, 160 << 20
    config = ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S, max_in_flight=64,
                           queue_bytes=queue_bytes, memory_bytes=memory_bytes, limits=Limits(max_frame_bytes=4 << 20))
    geometry = tiny_geometry(n_views=7, side=512)
    server, collector = make_server(config=config)
    baseline = _rss_bytes()
    push = make_socket(zmq.PUSH, connect=server.ingest_address, sndhwm=1000)
    frame = np.random.default_rng(0).integers(0, 4000, geometry.hologram_shape).astype(np.uint16)
    n_attackers, sent = 24, 0
    for a in range(n_attackers):
        acquisition_id = f"attacker-{a}"
        push.send_multipart(protocol.encode_start(acquisition_id, geometry))
        sent += 1
        for p in range(2):
            for v in range(geometry.n_views):
                push.send_multipart(protocol.encode_frame("view", acquisition_id, p, v, frame), copy=True)
                sent += 1
                if (p, v) != (1, geometry.n_views - 1):
                    push.send_multipart(protocol.encode_frame("background", acquisition_id, p, v, frame), copy=True)
                    sent += 1
    wait_until(lambda: server.status()["messages_received"] == sent, timeout_s=4 * DEADLINE_S)
    wait_until(lambda: server.status()["queue_messages"] == 0)
    status = server.status()
    grown = _rss_bytes() - baseline
    footprint = acquisition_footprint(protocol.build_message(
        protocol.parse_header(protocol.encode_start("x", geometry)[0]), []), server.service.reconstructor)
    admitted = (memory_bytes - queue_bytes) // footprint
    print(f"\nresident size grew by {grown / 2**20:.1f} MiB under attack; budget {memory_bytes / 2**20:.0f} MiB; "
          f"{status['acquisitions_in_flight']} admitted, {status['errors'].get('too_many_acquisitions', 0)} refused")
    assert status["acquisitions_in_flight"] == admitted >= 1
    assert status["errors"]["too_many_acquisitions"] == n_attackers - admitted
    assert status["acquisition_bytes_reserved"] <= memory_bytes - queue_bytes
    assert grown <= memory_bytes


class SlowFinalize(ViewMeanReconstructor):
    """An engine whose final reconstruction takes ``seconds`` (a large volume, in miniature)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def start(self, geometry, background):
        session = super().start(geometry, background)
        if geometry.n_views > 3:
            finalize = session.finalize

            def slow(allow_missing=False):
                threading.Event().wait(self.seconds)   # the engine's own compute time, not a test wait
                return finalize(allow_missing)

            session.finalize = slow
        return session


def test_an_acquisition_queued_behind_a_slow_one_is_not_timed_out(make_service):
    service, collector = make_service(SlowFinalize(1.0), ServiceConfig(status_interval_s=0.05,
                                                                       acquisition_timeout_s=0.3))
    large, small = tiny_geometry(n_views=5), tiny_geometry(n_views=3)
    a, b = random_acquisition(large, seed=1), random_acquisition(small, seed=2)
    handle_a = service.open("large", large, background=a.background)
    handle_b = service.open("small", small, background=b.background)
    for p in range(2):
        for v in range(large.n_views):
            handle_a.add_view(p, v, a.holograms[p, v])
    for p in range(2):   # these arrive while the worker is inside the large reconstruction
        for v in range(small.n_views):
            handle_b.add_view(p, v, b.holograms[p, v])
    assert handle_a.result(DEADLINE_S).complete
    assert handle_b.result(DEADLINE_S).complete
    assert "timeout" not in service.status()["errors"]


def test_an_idle_acquisition_still_times_out(make_service):
    service, collector = make_service(config=ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=0.2))
    geometry = tiny_geometry()
    handle = service.open("idle", geometry, background=random_acquisition(geometry).background)
    assert collector.wait_error("timeout").acquisition_id == "idle"
    with pytest.raises(Exception, match="timeout"):
        handle.result(DEADLINE_S)


def test_save_dir_names_are_unique_and_reversible_and_an_overwrite_is_a_counted_error(make_server, context, tmp_path):
    ids = ["run/1", "run_1", "run:1", "é", "e\u0301", "ü", "u", ".hidden", "..", "%41", "A", "a b"]
    config = ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S, remembered_ids=1)
    server, collector = make_server(config=config, save_dir=tmp_path / "v")
    geometry = tiny_geometry()
    with Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context) as producer:
        for acquisition_id in ids:
            producer.send_acquisition(random_acquisition(geometry), acquisition_id)
            collector.wait_volume(acquisition_id)
        wait_until(lambda: server.status()["volumes_saved"] == len(ids))
        names = sorted(p.name for p in (tmp_path / "v").iterdir())
        assert len(names) == len(ids) and not any(n.startswith(".") for n in names)
        assert sorted(urllib.parse.unquote(n[:-3]) for n in names) == sorted(ids)
        before = (tmp_path / "v" / f"{safe_filename('run_1')}.h5").read_bytes()
        producer.send_acquisition(random_acquisition(geometry, seed=9), "run_1")   # forgotten id, same name
        wait_until(lambda: server.status()["save_errors"] == 1)
    assert (tmp_path / "v" / f"{safe_filename('run_1')}.h5").read_bytes() == before
    assert server.status()["volumes_saved"] == len(ids)


def test_stale_part_files_of_a_killed_writer_are_removed(make_server, tmp_path):
    (tmp_path / "v").mkdir()
    stale = tmp_path / "v" / ".x.h5.abc123.part"
    stale.write_bytes(b"half")
    keep = tmp_path / "v" / "x.h5"
    keep.write_bytes(b"whole")
    make_server(save_dir=tmp_path / "v")
    assert not stale.exists() and keep.exists()


def _bad_key_files(tmp_path):
    public, secret = generate_keys(tmp_path / "keys", "server")
    (tmp_path / "folder").mkdir()
    return {"missing": tmp_path / "nope.key_secret", "public key": public, "folder": tmp_path / "folder"}


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
@pytest.mark.parametrize("case", ["missing", "public key", "folder"])
def test_a_bad_curve_key_file_is_a_clean_error_within_a_deadline(tmp_path, case):
    path = _bad_key_files(tmp_path)[case]
    outcome = {}

    def build():
        try:
            StreamingServer(ViewMeanReconstructor(), ANY_PORT, ANY_PORT, FAST, curve=CurveServer(path)).close()
        except Exception as error:   # the error the user sees
            outcome["error"] = error

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), "building the server hung (its context never terminated)"
    assert isinstance(outcome.get("error"), (FileNotFoundError, ValueError))


def _biref(*args):
    return [sys.executable, "-m", "biref_sdk", *args]


def _serve_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_serve_with_a_bad_key_file_ends_in_one_line(tmp_path):
    public = _bad_key_files(tmp_path)["public key"]
    run = subprocess.run(_biref("serve", "--ingest", ANY_PORT, "--results", ANY_PORT, "--curve-secret-key", str(public)),
                         capture_output=True, text=True, timeout=4 * DEADLINE_S, env=_serve_env())
    assert run.returncode == 1 and "no secret key" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--timeout", "nan"], "acquisition_timeout_s"),
    (["--timeout", "-1"], "acquisition_timeout_s"),
])
def test_serve_refuses_bad_settings_in_one_line(capsys, args, message):
    from biref_sdk.cli import main

    assert main(["serve", "--ingest", ANY_PORT, "--results", ANY_PORT, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_serve_on_a_port_in_use_ends_in_one_line(make_socket, context):
    taken = make_socket(zmq.PULL)
    taken.bind(ANY_PORT)
    address = taken.last_endpoint.decode()
    run = subprocess.run(_biref("serve", "--ingest", address, "--results", ANY_PORT, "--method", "formula"),
                         capture_output=True, text=True, timeout=4 * DEADLINE_S, env=_serve_env())
    assert run.returncode == 1 and "cannot bind" in run.stderr and "Traceback" not in run.stderr


def test_an_unread_log_pipe_never_stalls_the_service(make_socket, context):
    """`biref serve` without --quiet, stdout and stderr pipes that nobody reads after the handshake:
    3,000 rejected messages (3,000 error lines, far beyond a pipe's buffer) and the heartbeat goes on."""
    serve = subprocess.Popen(_biref("serve", "--ingest", ANY_PORT, "--results", ANY_PORT, "--status-interval", "0.1",
                                    "--method", "formula"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_serve_env())
    try:
        lines = [serve.stdout.readline().decode().split() for _ in range(2)]
        ingest, results = lines[0][1], lines[1][1]
        n = 3000
        with Subscriber(results, topics=("status",), context=context) as subscriber:
            subscriber.wait_ready(DEADLINE_S)
            push = make_socket(zmq.PUSH, connect=ingest, sndhwm=n)
            for i in range(n):
                push.send(msgpack.packb({"protocol": "biref/1", "type": "view", "acquisition_id": f"nobody-{i}"}))
            status = subscriber.wait_for(lambda r: r.header["rejected_messages"] >= n, 2 * DEADLINE_S).header
            assert status["rejected_messages"] >= n
            subscriber.wait_for(lambda r: r.header["uptime_s"] > status["uptime_s"], DEADLINE_S)   # heartbeat goes on
    finally:
        serve.kill()
        serve.wait(DEADLINE_S)


def test_a_camera_buffer_reused_right_after_send_does_not_change_what_was_sent(make_socket, context):
    """Above pyzmq's copy threshold a zero-copy send reads the buffer later, from ZeroMQ's I/O thread:
    here the message waits in the producer's queue (no peer yet) while the camera reuses its buffer."""
    address = "inproc://camera-buffer-reuse"   # connect before bind: the message waits in the producer
    with Producer(address, timeout_s=DEADLINE_S, context=context) as producer:
        frame = np.full((512, 512), 7, np.uint16)   # 512 KiB, far above the copy threshold
        producer.view("a", 0, 0, frame)
        frame[...] = 9                              # the camera writes its next image into the same buffer
        pull = make_socket(zmq.PULL)
        pull.bind(address)
        assert pull.poll(DEADLINE_S * 1000)
        frames = pull.recv_multipart()
    assert np.all(np.frombuffer(frames[1], "<u2") == 7)


def test_a_stop_after_one_view_is_incomplete_not_an_engine_error(make_service):
    pytest.importorskip("torch")
    from biref_sdk.reconstruction import get_reconstructor

    service, collector = make_service(get_reconstructor("formula"))
    geometry = tiny_geometry(n_views=7, side=64)
    acquisition = random_acquisition(geometry)
    handle = service.open("one-view", geometry, background=acquisition.background)
    handle.add_view(0, 0, acquisition.holograms[0, 0])
    handle.stop()
    try:
        result = handle.result(DEADLINE_S)
    except Exception as error:   # the engine cannot reconstruct from one view: the sender's incomplete acquisition
        assert getattr(error, "error").reason == "incomplete", error
    else:   # or it can, and says so
        assert not result.complete and result.incomplete_reason == "stop"
    assert "engine_error" not in service.status()["errors"]
