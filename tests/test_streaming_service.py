"""The in-process acquisition service: routing, every fault's defined outcome, back-pressure."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from biref_sdk.streaming import protocol
from biref_sdk.streaming.protocol import Limits
from biref_sdk.streaming.service import (AcquisitionFailed, AcquisitionService, BufferPool, ServiceClosed,
                                         ServiceConfig)
from test_streaming_support import (wire, DEADLINE_S, Collector, ViewMeanReconstructor, expected_view_means,
                                    random_acquisition, streamed_means, tiny_geometry, wait_until)

GEOMETRY = tiny_geometry()
FAST = ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=DEADLINE_S)


# context, make_server, make_service: tests/conftest.py


def stream(handle, acquisition, order=None):
    order = order or [(p, v) for p in range(2) for v in range(acquisition.geometry.n_views)]
    for p, v in order:
        handle.add_view(p, v, acquisition.holograms[p, v])



def test_complete_acquisition_gives_the_volume_of_exactly_its_views(make_service):
    service, collector = make_service()
    acquisition = random_acquisition(GEOMETRY, seed=1)
    handle = service.open("a", GEOMETRY, background=acquisition.background)
    stream(handle, acquisition)
    result = handle.result(DEADLINE_S)
    np.testing.assert_allclose(streamed_means(result.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    assert result.complete and result.views_used == result.views_expected == 6 and result.missing == ()
    assert result.engine == "view-mean" and result.latency_s >= 0
    assert result.volume.parameters["streaming"]["acquisition_id"] == "a"
    assert collector.wait_volume("a") is result
    status = service.status()
    assert status["volumes"] == 1 and status["views_accepted"] == 6 and status["rejected_messages"] == 0


def test_views_in_any_order_and_background_as_messages_interleaved(make_service):
    service, collector = make_service()
    acquisition = random_acquisition(GEOMETRY, seed=2)
    handle = service.open("a", GEOMETRY)
    order = [(1, 2), (0, 0), (1, 0), (0, 2), (0, 1), (1, 1)]
    # views before the background is whole wait for it; backgrounds in reverse order
    for i, (p, v) in enumerate(order):
        handle.add_view(p, v, acquisition.holograms[p, v])
        q, w = divmod(5 - i, 3)
        handle.add_background(q, w, acquisition.background[q, w])
    result = handle.result(DEADLINE_S)
    np.testing.assert_allclose(streamed_means(result.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    status = service.status()
    assert status["out_of_order_views"] > 0 and status["background_frames_accepted"] == 6


def test_interleaved_acquisitions_each_get_their_own_views(make_service):
    service, _ = make_service()
    acquisitions = {f"acq-{i}": random_acquisition(GEOMETRY, seed=10 + i) for i in range(3)}
    handles = {k: service.open(k, GEOMETRY, background=a.background) for k, a in acquisitions.items()}
    for p in range(2):
        for v in range(3):
            for key, acquisition in acquisitions.items():
                handles[key].add_view(p, v, acquisition.holograms[p, v])
    for key, acquisition in acquisitions.items():
        volume = handles[key].result(DEADLINE_S).volume
        np.testing.assert_allclose(streamed_means(volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)


def test_duplicate_view_is_rejected_and_the_first_kept(make_service):
    service, collector = make_service()
    acquisition = random_acquisition(GEOMETRY, seed=3)
    handle = service.open("a", GEOMETRY, background=acquisition.background)
    handle.add_view(0, 0, acquisition.holograms[0, 0])
    handle.add_view(0, 0, acquisition.holograms[0, 0] + 100)
    error = collector.wait_error("duplicate_view")
    assert not error.fatal and (error.acquisition_id, error.polarization, error.view) == ("a", 0, 0)
    stream(handle, acquisition, [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
    volume = handle.result(DEADLINE_S).volume
    np.testing.assert_allclose(streamed_means(volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    assert service.status()["rejected_messages"] == 1


def test_messages_for_unknown_or_finished_acquisitions(make_service):
    service, collector = make_service()
    acquisition = random_acquisition(GEOMETRY)
    view = wire(protocol.encode_frame("view", "ghost", 0, 0, acquisition.holograms[0, 0]))
    assert service.submit_frames(view)
    assert collector.wait_error("unknown_acquisition").acquisition_id == "ghost"
    service.submit_frames(wire(protocol.encode_stop("ghost")))
    assert collector.wait_error("unknown_acquisition").message_type == "stop"
    handle = service.open("done", GEOMETRY, background=acquisition.background)
    stream(handle, acquisition)
    handle.result(DEADLINE_S)
    handle.add_view(0, 0, acquisition.holograms[0, 0])            # a late view
    assert collector.wait_error("acquisition_finished").acquisition_id == "done"
    handle.stop()                                                  # stop after the volume: optional, harmless
    wait_until(lambda: service.status()["stops_after_volume"] == 1)
    assert service.status()["errors"] == {"unknown_acquisition": 2, "acquisition_finished": 1}


def test_frames_that_do_not_match_their_start(make_service):
    service, collector = make_service()
    acquisition = random_acquisition(GEOMETRY)
    service.open("a", GEOMETRY, background=acquisition.background)
    service.submit_frames(wire(protocol.encode_frame("view", "a", 0, 0, np.zeros((16, 16), np.uint16))))
    assert collector.wait_error("shape_mismatch").view == 0
    service.submit_frames(wire(protocol.encode_frame("view", "a", 0, 0, np.zeros((32, 32), np.float32))))
    collector.wait_error("shape_mismatch")
    service.submit_frames(wire(protocol.encode_frame("view", "a", 1, 3, acquisition.holograms[0, 0])))
    assert collector.wait_error("invalid_field").view == 3     # view index beyond the start's n_views
    service.submit_frames(wire(protocol.encode_frame("background", "a", 0, 0, acquisition.background[0, 0])))
    collector.wait_error("duplicate_background")                # the background came inline
    assert not service.submit_frames([b"\x93garbage"])
    collector.wait_error("malformed")
    assert service.status()["rejected_messages"] == 5


def test_in_process_api_rejects_bad_input_at_once(make_service):
    service, _ = make_service()
    with pytest.raises(ValueError):
        service.open("a", GEOMETRY, dtype="int32")
    with pytest.raises(ValueError):
        service.open("", GEOMETRY)
    handle = service.open("a", GEOMETRY)
    with pytest.raises(ValueError, match="already open"):
        service.open("a", GEOMETRY)
    with pytest.raises(ValueError, match="shape"):
        handle.add_view(0, 0, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="out of range"):
        handle.add_view(2, 0, np.zeros((32, 32)))
    with pytest.raises(ValueError, match="range of uint16"):
        handle.add_view(0, 0, np.full((32, 32), -1))


def test_stop_with_missing_views_gives_a_flagged_volume_of_the_views_present(make_service):
    service, _ = make_service()
    acquisition = random_acquisition(GEOMETRY, seed=4)
    handle = service.open("a", GEOMETRY, background=acquisition.background)
    present = np.ones((2, 3), bool)
    present[1, 1] = present[0, 2] = False
    stream(handle, acquisition, [tuple(i) for i in np.argwhere(present)])
    handle.stop()
    result = handle.result(DEADLINE_S)
    assert not result.complete and result.incomplete_reason == "stop"
    assert result.missing == ((0, 2), (1, 1)) and result.views_used == 4
    np.testing.assert_allclose(streamed_means(result.volume, GEOMETRY), expected_view_means(acquisition, present),
                               rtol=1e-6)
    assert result.volume.parameters["streaming"]["complete"] is False
    assert service.status()["partial_volumes"] == 1


def test_stop_with_nothing_to_reconstruct_fails_the_acquisition(make_service):
    service, collector = make_service()
    handle = service.open("a", GEOMETRY)                          # background never sent
    handle.add_view(0, 0, np.zeros((32, 32), np.uint16))
    handle.stop()
    with pytest.raises(AcquisitionFailed) as info:
        handle.result(DEADLINE_S)
    assert info.value.error.reason == "incomplete" and info.value.error.fatal
    assert service.status()["acquisitions_in_flight"] == 0


def test_timeout_drops_a_stalled_acquisition_or_flags_a_partial_volume(make_service):
    acquisition = random_acquisition(GEOMETRY, seed=5)
    service, collector = make_service(config=ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=0.2))
    handle = service.open("stalled", GEOMETRY, background=acquisition.background)
    handle.add_view(0, 0, acquisition.holograms[0, 0])
    with pytest.raises(AcquisitionFailed) as info:
        handle.result(DEADLINE_S)
    assert info.value.error.reason == "timeout" and "1/6 views" in info.value.error.detail
    handle.add_view(0, 1, acquisition.holograms[0, 1])
    collector.wait_error("acquisition_finished")

    service, _ = make_service(config=ServiceConfig(status_interval_s=0.05, acquisition_timeout_s=0.2,
                                                   partial_on_timeout=True))
    handle = service.open("stalled", GEOMETRY, background=acquisition.background)
    handle.add_view(1, 2, acquisition.holograms[1, 2])
    result = handle.result(DEADLINE_S)
    assert not result.complete and result.incomplete_reason == "timeout" and result.views_used == 1


def test_start_faults(make_service):
    acquisition = random_acquisition(GEOMETRY)
    service, collector = make_service(config=ServiceConfig(status_interval_s=0.05, max_in_flight=2))
    first = service.open("a", GEOMETRY, background=acquisition.background)
    service.submit_frames(wire(protocol.encode_start("a", GEOMETRY, background=acquisition.background)))
    error = collector.wait_error("duplicate_start")
    assert not error.fatal
    service.open("b", GEOMETRY)
    third = service.open("c", GEOMETRY)
    with pytest.raises(AcquisitionFailed, match="too_many_acquisitions"):
        third.result(DEADLINE_S)
    stream(first, acquisition)                      # the first "a" is unaffected
    np.testing.assert_allclose(streamed_means(first.result(DEADLINE_S).volume, GEOMETRY),
                               expected_view_means(acquisition), rtol=1e-6)

    service, collector = make_service(ViewMeanReconstructor(reject_start=True))
    handle = service.open("x", GEOMETRY, background=acquisition.background)
    with pytest.raises(AcquisitionFailed, match="engine_rejected"):
        handle.result(DEADLINE_S)


def test_engine_failure_costs_one_acquisition_not_the_service(make_service):
    service, collector = make_service(ViewMeanReconstructor(fail_at=(1, 1)))
    acquisition = random_acquisition(GEOMETRY, seed=6)
    broken = service.open("broken", GEOMETRY, background=acquisition.background)
    stream(broken, acquisition)
    with pytest.raises(AcquisitionFailed, match="injected engine failure"):
        broken.result(DEADLINE_S)
    collector.wait_error("acquisition_finished")   # the view after the failure
    fine = service.open("fine", GEOMETRY, background=acquisition.background)
    stream(fine, acquisition, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)])
    fine.stop()
    assert fine.result(DEADLINE_S).views_used == 5


def test_a_failing_callback_is_counted_and_the_service_carries_on():
    acquisition = random_acquisition(GEOMETRY)

    def on_volume(result):
        raise RuntimeError("vendor bug")

    with AcquisitionService(ViewMeanReconstructor(), FAST, on_volume=on_volume) as service:
        for key in ("a", "b"):
            handle = service.open(key, GEOMETRY, background=acquisition.background)
            stream(handle, acquisition)
            handle.result(DEADLINE_S)
        assert service.status()["callback_errors"] == 2


def test_back_pressure_blocks_the_caller_and_loses_nothing(make_service):
    gate = threading.Event()
    frame_bytes = 32 * 32 * 2
    config = ServiceConfig(status_interval_s=0.05, queue_bytes=3 * frame_bytes,
                           limits=Limits(max_frame_bytes=frame_bytes))
    service, collector = make_service(ViewMeanReconstructor(gate=gate), config)
    acquisition = random_acquisition(GEOMETRY, seed=7)
    handle = service.open("a", GEOMETRY)
    for q in range(2):
        for w in range(3):
            handle.add_background(q, w, acquisition.background[q, w])
    accepted = []
    with pytest.raises(TimeoutError, match="busy"):
        for p, v in [(p, v) for p in range(2) for v in range(3)]:
            handle.add_view(p, v, acquisition.holograms[p, v], timeout_s=0.2)
            accepted.append((p, v))
    # the engine holds one frame, the pool three more: then the caller had to wait
    assert 3 <= len(accepted) <= 4
    assert service.pool.in_use_bytes <= config.queue_bytes
    gate.set()
    stream(handle, acquisition, [(p, v) for p in range(2) for v in range(3) if (p, v) not in accepted])
    volume = handle.result(DEADLINE_S).volume
    np.testing.assert_allclose(streamed_means(volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)
    assert service.status()["rejected_messages"] == 0


def test_buffer_pool_never_allocates_beyond_its_capacity():
    pool = BufferPool(1000)
    a = pool.take(400)
    b = pool.take(400)
    assert pool.take(400, timeout_s=0.01) is None
    pool.give(a)
    pool.give(b)
    c = pool.take(900)                 # idle buffers of another size are freed to make room
    assert c.nbytes == 900 and pool._allocated <= 1000
    pool.give(c)
    assert pool.take(900) is c         # reused, not reallocated
    with pytest.raises(ValueError):
        pool.take(1001)
    pool.close()
    with pytest.raises(ServiceClosed):
        pool.take(10)


def test_close_fails_what_is_in_flight_and_refuses_more():
    collector = Collector()
    service = AcquisitionService(ViewMeanReconstructor(), FAST, **collector.callbacks())
    handle = service.open("a", GEOMETRY)
    service.close(DEADLINE_S)
    with pytest.raises(AcquisitionFailed, match="shutdown"):
        handle.result(0)
    with pytest.raises(ServiceClosed):
        handle.add_view(0, 0, np.zeros((32, 32), np.uint16))
    assert collector.statuses[-1]["errors"] == {"shutdown": 1}


def test_previews_while_views_arrive():
    previews = []
    acquisition = random_acquisition(GEOMETRY, seed=8)
    config = ServiceConfig(status_interval_s=0.05, preview_every=2)
    with AcquisitionService(ViewMeanReconstructor(), config, on_preview=previews.append) as service:
        handle = service.open("a", GEOMETRY, background=acquisition.background)
        stream(handle, acquisition)
        final = handle.result(DEADLINE_S)
    # after views 2 and 4 (the 6th completes the acquisition: a volume, not a preview)
    assert [p.views_used for p in previews] == [2, 4]
    assert all(p.preview and not p.complete and p.incomplete_reason == "preview" for p in previews)
    present = np.zeros((2, 3), bool)
    present[0, :2] = True
    np.testing.assert_allclose(streamed_means(previews[0].volume, GEOMETRY), expected_view_means(acquisition, present),
                               rtol=1e-6)
    assert final.complete


def test_a_small_acquisition_finishes_while_a_large_one_still_reconstructs(make_service):
    import threading

    from test_streaming_support import ViewMeanSession

    release = threading.Event()
    large_geometry = tiny_geometry(n_views=4)

    class SlowForLarge(ViewMeanReconstructor):
        def start(self, geometry, background):
            session = ViewMeanSession(self, geometry, background)
            if geometry.n_views == 4:   # the large acquisition's finalize takes until released
                finalize = session.finalize
                session.finalize = lambda allow_missing=False: (release.wait(DEADLINE_S), finalize(allow_missing))[1]
            return session

    service, _ = make_service(SlowForLarge(), ServiceConfig(workers=2, acquisition_timeout_s=DEADLINE_S))
    try:
        large = random_acquisition(large_geometry, seed=5)
        large_handle = service.open("large", large_geometry, background=large.background)
        stream(large_handle, large)
        wait_until(lambda: service.status()["workers_busy"] == 1, DEADLINE_S)   # large is finalizing
        small = random_acquisition(GEOMETRY, seed=6)
        small_handle = service.open("small", GEOMETRY, background=small.background)
        stream(small_handle, small)
        assert small_handle.result(DEADLINE_S).complete   # not behind the large one
        with pytest.raises(TimeoutError):
            large_handle.result(0.05)
        release.set()
        assert large_handle.result(DEADLINE_S).complete
        assert service.status()["workers"] == 2
    finally:
        release.set()
