"""The ZeroMQ service under faults: bad messages, oversized frames, a producer that dies, a stalled
subscriber, a flood beyond capacity, concurrent producers, CURVE. Loopback only, random ports,
linger 0, every receive with a deadline."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import msgpack
import numpy as np
import pytest
import zmq

from biref_sdk.streaming import protocol
from biref_sdk.streaming.client import Producer, ResultError, Subscriber
from biref_sdk.streaming.protocol import Limits
from biref_sdk.streaming.service import ServiceConfig
from test_streaming_support import (wire, DEADLINE_S, ViewMeanReconstructor, expected_view_means,
                                    random_acquisition, streamed_means, tiny_geometry, wait_until)

GEOMETRY = tiny_geometry()
FAST = ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S)
ANY_PORT = "tcp://127.0.0.1:0"


# context, make_server, make_service: tests/conftest.py


def connect(server, context, **options):
    producer = Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context, **options)
    subscriber = Subscriber(server.results_address, context=context)
    subscriber.wait_ready(DEADLINE_S)
    return producer, subscriber



def test_bad_messages_get_their_reasons_on_the_error_topic_and_good_ones_still_work(make_server, context):
    server, _ = make_server()
    producer, subscriber = connect(server, context)
    acquisition = random_acquisition(GEOMETRY, seed=1)
    view = wire(protocol.encode_frame("view", "a", 0, 0, acquisition.holograms[0, 0]))
    header = msgpack.unpackb(view[0])
    bad = [
        ([b"\xc1\xc1 not msgpack"], "malformed"),
        ([msgpack.packb({**header, "protocol": "biref/0"}), view[1]], "unsupported_protocol"),
        ([msgpack.packb({**header, "type": "teleport"}), view[1]], "unknown_type"),
        ([view[0], view[1][:100]], "size_mismatch"),
        ([view[0]], "frame_count"),
        ([view[0], view[1], b"surplus", b"frames"], "frame_count"),
        ([msgpack.packb({**header, "shape": [32, 32, 1]}), view[1]], "invalid_field"),
        (view, "unknown_acquisition"),                                 # a view before its start
    ]
    for frames, _ in bad:
        producer.send(frames)
    reasons = [subscriber.wait_for(lambda r: r.topic == "error", DEADLINE_S).header["reason"] for _ in bad]
    assert reasons == [reason for _, reason in bad]
    producer.send_acquisition(acquisition, "a")
    result = subscriber.wait_volume("a", DEADLINE_S)
    np.testing.assert_allclose(streamed_means(result.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    wait_until(lambda: server.status()["messages_received"] == len(bad) + 8)
    status = server.status()
    assert status["rejected_messages"] == len(bad) and sum(status["errors"].values()) == len(bad)
    assert status["bytes_received"] > acquisition.holograms.nbytes
    producer.close()
    subscriber.close()


def test_oversized_frame_disconnects_that_peer_before_allocation(make_server, context):
    limits = Limits(max_frame_bytes=64 * 1024)
    server, collector = make_server(config=ServiceConfig(status_interval_s=0.05, queue_bytes=1 << 20, limits=limits))
    rogue = Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context)
    header = wire(protocol.encode_frame("view", "x", 0, 0, np.zeros((32, 32), np.uint16)))[0]
    rogue.send([header, b"\0" * (1 << 20)])               # 1 MiB: above ZMQ_MAXMSGSIZE
    wait_until(lambda: server.status()["disconnects"] >= 1)
    rogue.close(linger_s=0)
    assert server.status()["messages_received"] == 0
    producer, subscriber = connect(server, context)
    acquisition = random_acquisition(GEOMETRY, seed=2)
    producer.send_acquisition(acquisition, "after")
    subscriber.wait_volume("after", DEADLINE_S)
    producer.close()
    subscriber.close()


DYING_PRODUCER = textwrap.dedent("""
    import sys, msgpack, numpy as np, zmq
    from biref_sdk.streaming import protocol
    from test_streaming_support import tiny_geometry, random_acquisition
    acquisition = random_acquisition(tiny_geometry(), seed=3)
    socket = zmq.Context().socket(zmq.PUSH)
    socket.connect(sys.argv[1])
    socket.send_multipart(protocol.encode_start("doomed", acquisition.geometry, background=acquisition.background))
    for v in range(2):
        socket.send_multipart(protocol.encode_frame("view", "doomed", 0, v, acquisition.holograms[0, v]))
    print("sent", flush=True)
    sys.stdin.read()   # wait to be killed
""")


def test_a_producer_killed_mid_acquisition_ends_in_a_timeout_error(make_server, context, tmp_path):
    server, collector = make_server(config=ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=0.5))
    subscriber = Subscriber(server.results_address, context=context)
    subscriber.wait_ready(DEADLINE_S)
    process = subprocess.Popen([sys.executable, "-c", DYING_PRODUCER, server.ingest_address], cwd=str(_tests_dir()),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.status()["views_accepted"] == 2)
        process.kill()
        process.wait(DEADLINE_S)
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(ResultError, match="timeout") as info:
        subscriber.wait_volume("doomed", DEADLINE_S)
    assert info.value.header["fatal"] and "2/6 views" in info.value.header["detail"]
    # the service carries on with the next microscope
    producer = Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context)
    producer.send_acquisition(random_acquisition(GEOMETRY), "next")
    subscriber.wait_volume("next", DEADLINE_S)
    producer.close()
    subscriber.close()


def _tests_dir():
    from pathlib import Path

    return Path(__file__).parent


def test_a_stalled_subscriber_never_stalls_the_service_and_sees_its_losses(make_server, context):
    # 1.3 MB volumes, tiny high-water marks: the stalled subscriber must lose some
    geometry = tiny_geometry(side=128, volume_shape=(32, 64, 64))
    server, collector = make_server(results_hwm=2)
    stalled = Subscriber(server.results_address, topics=("volume", "status"), rcvhwm=2, context=context)
    stalled.wait_ready(DEADLINE_S)
    absent_topic = Subscriber(server.results_address, topics=("preview",), context=context)   # never reads at all
    producer = Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context)
    acquisition = random_acquisition(geometry, seed=4)
    n = 30
    for i in range(n):
        producer.send_acquisition(acquisition, f"acq-{i}")
    for i in range(n):                                   # the service published every volume meanwhile
        collector.wait_volume(f"acq-{i}")
    # catch up: a heartbeat sent after the n-th volume means every earlier message came or was dropped
    received = sum(r.topic == "volume" for r in _read_until(
        stalled, lambda r: r.topic == "status" and r.header["volumes"] == n))
    producer.send_acquisition(acquisition, "marker")
    received += sum(r.topic == "volume" for r in _read_until(
        stalled, lambda r: r.topic == "volume" and r.acquisition_id == "marker"))
    assert stalled.missed["volume"] > 0
    assert received + stalled.missed["volume"] == n + 1
    for client in (producer, stalled, absent_topic):
        client.close()


def _read_until(subscriber, predicate):
    results = []
    while not results or not predicate(results[-1]):
        results.append(subscriber.recv(DEADLINE_S))
    return results


def test_a_flood_beyond_capacity_meets_back_pressure_and_nothing_is_lost(make_server, context):
    gate = threading.Event()
    geometry = tiny_geometry(side=512)
    frame_bytes = 512 * 512 * 2
    config = ServiceConfig(status_interval_s=0.05, queue_bytes=8 * frame_bytes,
                           limits=Limits(max_frame_bytes=6 * frame_bytes))
    server, collector = make_server(ViewMeanReconstructor(gate=gate), config, ingest_hwm=4)
    acquisition = random_acquisition(geometry, seed=5)
    messages = []
    for i in range(20):
        messages.append(protocol.encode_start(f"acq-{i}", geometry, background=acquisition.background))
        messages += [protocol.encode_frame("view", f"acq-{i}", p, v, acquisition.holograms[p, v])
                     for p in range(2) for v in range(3)]
    flood = Producer(server.ingest_address, timeout_s=0.2, sndhwm=4, context=context)
    sent = 0
    with pytest.raises(TimeoutError):
        for frames in messages:
            flood.send(frames)
            sent += 1
    # the engine is stuck: ZeroMQ queues and the service's buffers filled, then the sender was refused
    assert sent < len(messages)
    assert server.service.pool.in_use_bytes <= config.queue_bytes
    gate.set()
    flood.socket.sndtimeo = int(DEADLINE_S * 1000)
    for frames in messages[sent:]:
        flood.send(frames)
    for i in range(20):
        volume = collector.wait_volume(f"acq-{i}").volume
        np.testing.assert_allclose(streamed_means(volume, geometry), expected_view_means(acquisition), rtol=1e-6)
    status = server.status()
    assert status["rejected_messages"] == 0 and status["messages_received"] == len(messages)
    assert status["ingest_waits"] >= 1
    flood.close()


def test_concurrent_producers_with_interleaved_acquisitions(make_server, context):
    server, collector = make_server()
    acquisitions = {f"{who}-{i}": random_acquisition(GEOMETRY, seed=10 * k + i)
                    for k, who in enumerate(("left", "right")) for i in range(3)}
    failures = []

    def microscope(who):
        try:
            with Producer(server.ingest_address, timeout_s=DEADLINE_S, context=context) as producer:
                keys = [k for k in acquisitions if k.startswith(who)]
                for key in keys:    # all of this producer's acquisitions open at once, views interleaved
                    producer.start(key, GEOMETRY, background=acquisitions[key].background)
                for p in range(2):
                    for v in range(3):
                        for key in keys:
                            producer.view(key, p, v, acquisitions[key].holograms[p, v])
        except Exception as error:
            failures.append(error)

    threads = [threading.Thread(target=microscope, args=(who,)) for who in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert not failures
    for key, acquisition in acquisitions.items():
        volume = collector.wait_volume(key).volume
        np.testing.assert_allclose(streamed_means(volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE support")
def test_curve_admits_authorized_clients_only(make_server, context, tmp_path):
    from biref_sdk.streaming.security import CurveClient, CurveServer, generate_keys

    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    client_public, client_secret = generate_keys(tmp_path / "client", "client")
    _, intruder_secret = generate_keys(tmp_path / "intruder", "intruder")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes(client_public.read_bytes())
    server, collector = make_server(curve=CurveServer(server_secret, authorized))
    client_keys = CurveClient(client_secret, server_public)
    subscriber = Subscriber(server.results_address, curve=client_keys, context=context)
    subscriber.wait_ready(DEADLINE_S)
    acquisition = random_acquisition(GEOMETRY, seed=6)
    with Producer(server.ingest_address, timeout_s=DEADLINE_S, curve=client_keys, context=context) as producer:
        producer.send_acquisition(acquisition, "trusted")
    result = subscriber.wait_volume("trusted", DEADLINE_S)
    np.testing.assert_allclose(streamed_means(result.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    # start + 2V views + stop: the stop may still be in flight when the volume is out
    expected = 2 + 2 * GEOMETRY.n_views
    wait_until(lambda: server.status()["messages_received"] >= expected)
    received = server.status()["messages_received"]
    assert received == expected
    failures = server.status()["handshake_failures"]
    intruder = Producer(server.ingest_address, timeout_s=0.5, context=context,
                        curve=CurveClient(intruder_secret, server_public))
    plain = Producer(server.ingest_address, timeout_s=0.5, context=context)
    for rogue in (intruder, plain):
        try:
            rogue.send_acquisition(acquisition, "rogue")
        except TimeoutError:
            pass    # never admitted, so its queue fills and the send times out: also a pass
    wait_until(lambda: server.status()["handshake_failures"] >= failures + 2)
    assert server.status()["messages_received"] == received
    assert all(v.acquisition_id != "rogue" for v in collector.volumes)
    intruder.close(linger_s=0)
    plain.close(linger_s=0)
    subscriber.close()
