"""The per-acquisition state machine on its own: every message kind and every outcome, driven
synchronously with chosen times (no threads, no sockets)."""
from __future__ import annotations

import numpy as np
import pytest

from biref_sdk.streaming.acquisition import AcquisitionMachine
from biref_sdk.streaming.protocol import Frame, Start, Stop
from test_streaming_support import ViewMeanReconstructor, expected_view_means, random_acquisition, streamed_means, tiny_geometry

GEOMETRY = tiny_geometry()   # 3 views per polarization
VIEWS = [(p, v) for p in range(2) for v in range(3)]


def start(background=None, t=0.0):
    return Start("a", GEOMETRY, np.dtype("<u2"), background, received_s=t)


def view(acquisition, p, v, t=1.0, kind="view"):
    frames = acquisition.background if kind == "background" else acquisition.holograms
    return Frame(kind, "a", p, v, frames[p, v], received_s=t)


def machine(engine=None, background=True, preview_every=0, clock=lambda: 10.0):
    acquisition = random_acquisition(GEOMETRY, seed=3)
    m = AcquisitionMachine(start(acquisition.background if background else None), engine or ViewMeanReconstructor(),
                           "view-mean", preview_every, clock=clock)
    out = m.begin(start(acquisition.background if background else None))
    assert not out.errors and out.volume is None
    return m, acquisition


def test_all_views_give_one_volume_with_its_latency_from_the_last_view():
    m, acquisition = machine()
    for i, (p, v) in enumerate(VIEWS[:-1]):
        out = m.frame(view(acquisition, p, v, t=1.0 + i), now_s=1.0 + i)
        assert out.counts == {"views_accepted": 1} and out.volume is None and not out.errors
    out = m.frame(view(acquisition, *VIEWS[-1], t=8.5), now_s=8.5)
    assert out.volume is not None and out.finished and m.done
    assert out.counts == {"views_accepted": 1, "volumes": 1}
    assert out.volume.latency_s == pytest.approx(1.5)   # injected clock 10.0 - last view 8.5
    assert out.volume.complete and out.volume.missing == ()
    np.testing.assert_allclose(streamed_means(out.volume.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)


def test_views_before_the_background_wait_for_it_and_out_of_order_is_counted():
    m, acquisition = machine(background=False)
    assert m.phase == "background"
    out = m.frame(view(acquisition, 1, 2), now_s=1)
    assert out.counts == {"views_accepted": 1} and m.pending
    out = m.frame(view(acquisition, 0, 0), now_s=2)
    assert out.counts == {"views_accepted": 1, "out_of_order_views": 1}
    for p, v in VIEWS:
        out = m.frame(view(acquisition, p, v, kind="background"), now_s=3)
    assert m.phase == "views" and not m.pending and out.counts == {"background_frames_accepted": 1}
    for p, v in VIEWS:
        if (p, v) not in ((1, 2), (0, 0)):
            out = m.frame(view(acquisition, p, v), now_s=4)
    assert out.volume is not None
    np.testing.assert_allclose(streamed_means(out.volume.volume, GEOMETRY), expected_view_means(acquisition), rtol=1e-6)


@pytest.mark.parametrize("case, reason", [
    ("duplicate view", "duplicate_view"), ("wrong shape", "shape_mismatch"), ("wrong dtype", "shape_mismatch"),
    ("view beyond the geometry", "invalid_field"), ("duplicate background", "duplicate_background"),
    ("background after an inline one", "duplicate_background")])
def test_rejected_messages_leave_the_acquisition_running(case, reason):
    m, acquisition = machine(background=case != "duplicate background")
    first = view(acquisition, 0, 0, kind="background" if case == "duplicate background" else "view")
    message = {
        "duplicate view": first,
        "wrong shape": Frame("view", "a", 0, 1, np.zeros((16, 16), np.uint16)),
        "wrong dtype": Frame("view", "a", 0, 1, np.zeros((32, 32), np.float32)),
        "view beyond the geometry": Frame("view", "a", 0, 5, acquisition.holograms[0, 0]),
        "duplicate background": first,
        "background after an inline one": view(acquisition, 0, 0, kind="background"),
    }[case]
    if case in ("duplicate view", "duplicate background"):
        assert not m.frame(first, now_s=1).errors
    out = m.frame(message, now_s=2)
    assert [e.reason for e in out.errors] == [reason]
    assert not out.errors[0].fatal and not out.finished and not m.done


def test_stop_gives_a_flagged_partial_volume_or_fails_with_nothing_to_reconstruct():
    m, acquisition = machine()
    m.frame(view(acquisition, 0, 0), now_s=1)
    out = m.stop(Stop("a"), now_s=2)
    assert out.volume is not None and not out.volume.complete and out.volume.incomplete_reason == "stop"
    assert out.counts == {"volumes": 1, "partial_volumes": 1} and len(out.volume.missing) == 5
    empty, _ = machine()
    out = empty.stop(Stop("a"), now_s=2)
    assert [e.reason for e in out.errors] == ["incomplete"] and out.errors[0].fatal and empty.done


def test_expiry_uses_the_time_given_and_respects_activity():
    m, acquisition = machine()
    m.frame(view(acquisition, 0, 0), now_s=100.0)
    assert not m.expire(now_s=104.0, timeout_s=5.0, partial=False).errors   # active 4 s ago
    out = m.expire(now_s=106.0, timeout_s=5.0, partial=False)
    assert [e.reason for e in out.errors] == ["timeout"] and out.errors[0].fatal and m.done
    partial, acquisition = machine()
    partial.frame(view(acquisition, 0, 0), now_s=100.0)
    out = partial.expire(now_s=106.0, timeout_s=5.0, partial=True)
    assert out.volume is not None and out.volume.incomplete_reason == "timeout"


def test_engine_failures_and_refusals_fail_the_acquisition_once():
    m, acquisition = machine(ViewMeanReconstructor(fail_at=(0, 1)))
    assert not m.frame(view(acquisition, 0, 0), now_s=1).errors
    out = m.frame(view(acquisition, 0, 1), now_s=2)
    assert [e.reason for e in out.errors] == ["engine_error"] and out.errors[0].fatal and m.done
    acquisition = random_acquisition(GEOMETRY, seed=3)
    refused = AcquisitionMachine(start(acquisition.background), ViewMeanReconstructor(reject_start=True), "view-mean")
    out = refused.begin(start(acquisition.background))
    assert [e.reason for e in out.errors] == ["engine_rejected"] and out.errors[0].fatal and refused.done


def test_previews_every_n_views_and_shutdown_of_a_running_acquisition():
    m, acquisition = machine(preview_every=2)
    previews = [m.frame(view(acquisition, p, v), now_s=1).preview for p, v in VIEWS[:4]]
    assert [p is not None for p in previews] == [False, True, False, True]
    assert previews[1].preview and previews[1].views_used == 2
    out = m.shutdown()
    assert [e.reason for e in out.errors] == ["shutdown"] and m.done
    assert not m.shutdown().errors   # once
