"""The batch entry point: ``receive_batch(frames, now)`` gives what ``receive`` gives frame by frame.

Frames are recorded at the balancer during a short simulated run (every ``receive`` and every ``on_timer`` call,
with the time and what the balancer answered), so the sequences fed here are realistic: sessions opened,
label-switched both ways, measured, closed and expired, plus one server that stops answering. Replayed on fresh
balancers (same config, same label allocation order) they recreate the same sessions; mutated copies of recorded
frames are mixed in.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SIM, frames_only, mutate, mutation, recording
from mplslb.balancer import Balancer, Frames


def test_the_recording_is_realistic() -> None:
    _, calls = recording()
    frames = frames_only()
    assert len(frames) > 500
    assert any(c.port < 0 for c in calls)  # timers ran
    config = recording()[0]
    roles = {p.port_id: p.role for p in config.ports}
    labelled = [c for c in frames if c.frame[12:14] == b"\x88\x47"]
    assert {roles[c.port] for c in labelled} == {"client", "server"}  # fast path both ways
    assert len(frames) - len(labelled) >= SIM.workload.sessions  # each session's first frame, unlabelled


def test_replaying_the_recording_reproduces_the_run() -> None:
    """The recording is complete: a fresh balancer fed the same calls answers the same frames."""
    config, calls = recording()
    b = Balancer(config)
    # The server events of the run change the pool; replay them at their times as the simulation did.
    events = sorted(SIM.events, key=lambda e: e.at)
    for call in calls:
        while events and events[0].at <= call.now:
            event = events.pop(0)
            if event.action == "recover":
                b.mark_up(event.server)
        out = b.receive(call.port, call.frame, call.now) if call.port >= 0 else b.on_timer(call.now)
        assert tuple(out) == call.out


def test_the_whole_recording_in_batches() -> None:
    config, _ = recording()
    frames = frames_only()
    one, many = Balancer(config), Balancer(config)
    for start in range(0, len(frames), 50):
        batch = frames[start : start + 50]
        now = batch[-1].now
        expected: Frames = []
        for c in batch:
            expected += one.receive(c.port, c.frame, now)
        assert many.receive_batch([(c.port, c.frame) for c in batch], now) == expected
    assert one.stats() == many.stats()
    assert one.stats().fast_path > 0 and one.stats().sessions_started > 0


def test_empty_batch() -> None:
    config, _ = recording()
    b = Balancer(config)
    assert b.receive_batch([], 1.0) == []
    assert b.receive_batch(iter(()), 1.0) == []
    assert b.stats().frames_in == 0


@st.composite
def sequences(draw: st.DrawFn) -> list[tuple[list[tuple[int, bytes, bool]], float, bool]]:
    """A prefix of the recorded frames, mutated frames mixed in, split into batches:
    [(batch of (port, frame, as memoryview), now, run the timer after)]."""
    frames = frames_only()
    n = draw(st.integers(1, min(len(frames), 400)))
    items: list[tuple[int, bytes, float]] = []
    for c in frames[:n]:
        items.append((c.port, c.frame, c.now))
        if draw(st.integers(0, 9)) == 0:
            source = frames[draw(st.integers(0, len(frames) - 1))]
            port = draw(st.sampled_from([c.port, source.port]))
            items.append((port, mutate(source.frame, draw(st.lists(mutation, min_size=1, max_size=3))), c.now))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(items)), max_size=12))) | {len(items)})
    batches = []
    start = 0
    for cut in cuts:
        chunk = items[start:cut]
        views = draw(st.lists(st.booleans(), min_size=len(chunk), max_size=len(chunk)))
        batch = [(port, frame, view) for (port, frame, _), view in zip(chunk, views, strict=True)]
        batches.append((batch, chunk[-1][2], draw(st.booleans())))
        start = cut
    return batches


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches=sequences())
def test_batch_equals_frame_by_frame(batches: list[tuple[list[tuple[int, bytes, bool]], float, bool]]) -> None:
    config, _ = recording()
    one, many = Balancer(config), Balancer(config)
    for batch, now, timer in batches:
        expected: Frames = []
        for port, frame, _ in batch:
            expected += one.receive(port, frame, now)
        got = many.receive_batch([(port, memoryview(frame) if view else frame) for port, frame, view in batch], now)
        assert got == expected
        assert all(isinstance(data, bytes) for _, data in got)
        if timer:
            assert many.on_timer(now + 1.0) == one.on_timer(now + 1.0)
        assert many.next_deadline() == one.next_deadline()
    assert many.stats() == one.stats()
    assert many.stats().frames_in == sum(len(batch) for batch, _, _ in batches)
