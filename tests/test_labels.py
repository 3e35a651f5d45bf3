"""The session label managing unit: pair arithmetic, FIFO allocation, quarantine, exhaustion."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mplslb.labels import (
    C2S_MAX,
    C2S_MIN,
    LABEL_SPACE,
    PAIRS,
    LabelManager,
    LabelStats,
    c2s_of,
    is_c2s,
    is_s2c,
    pair_of,
    s2c_of,
)
from mplslb.state import Column, HeapArrays

# -- pair arithmetic ----------------------------------------------------------------------------------------


def test_constants_describe_the_whole_label_space() -> None:
    assert LABEL_SPACE == 2**20
    assert C2S_MIN == 17  # the first odd label above the reserved 0-15
    assert C2S_MAX + 1 == LABEL_SPACE - 2  # the highest S2C label fits in 20 bits
    assert PAIRS == 524279 == len(range(C2S_MIN, C2S_MAX + 1, 2))


@pytest.mark.parametrize("c2s", [C2S_MIN, 19, 1001, C2S_MAX])
def test_s2c_is_c2s_plus_one_and_back(c2s: int) -> None:
    s2c = s2c_of(c2s)
    assert s2c == c2s + 1
    assert c2s_of(s2c) == c2s
    assert is_c2s(c2s) and not is_s2c(c2s)
    assert is_s2c(s2c) and not is_c2s(s2c)
    assert pair_of(c2s) == pair_of(s2c) == c2s


@pytest.mark.parametrize("label", [0, 1, 15, 16, C2S_MAX + 2, LABEL_SPACE - 1, LABEL_SPACE, -1])
def test_labels_outside_the_session_range_belong_to_no_pair(label: int) -> None:
    assert not is_c2s(label)
    assert not is_s2c(label)
    with pytest.raises(ValueError, match="not a session label"):
        pair_of(label)


# -- construction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"c2s_min": 18}, "c2s_min"),
        ({"c2s_min": 15}, "c2s_min"),
        ({"c2s_max": C2S_MAX + 2}, "c2s_max"),
        ({"c2s_max": 100}, "c2s_max"),
        ({"c2s_min": 101, "c2s_max": 99}, "must not exceed"),
        ({"quarantine": -1.0}, "quarantine"),
        ({"quarantine": float("nan")}, "quarantine"),
        ({"quarantine": float("inf")}, "quarantine"),
    ],
)
def test_bad_construction_raises_naming_the_argument(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelManager(**kwargs)  # type: ignore[arg-type]


def test_a_narrowed_range_has_its_own_capacity() -> None:
    manager = LabelManager(c2s_min=101, c2s_max=109)
    assert manager.capacity == manager.free_count == 5
    assert [manager.allocate(0.0) for _ in range(6)] == [101, 103, 105, 107, 109, None]


# -- allocation, withdrawal, quarantine ---------------------------------------------------------------------


def test_allocation_is_fifo_and_a_freed_pair_goes_to_the_back() -> None:
    manager = LabelManager(quarantine=10.0, c2s_min=17, c2s_max=23)  # 4 pairs
    assert [manager.allocate(0.0) for _ in range(3)] == [17, 19, 21]
    manager.withdraw(17, now=1.0)
    # 23 was never used, so it comes before 17 even once 17's quarantine is over.
    assert manager.allocate(11.0) == 23
    assert manager.allocate(11.0) == 17


def test_allocated_pair_is_in_use_on_both_labels_until_withdrawn() -> None:
    manager = LabelManager(quarantine=5.0)
    c2s = manager.allocate(0.0)
    assert c2s is not None
    assert manager.in_use(c2s) and manager.in_use(c2s + 1)
    manager.withdraw(c2s, now=1.0)
    assert not manager.in_use(c2s) and not manager.in_use(c2s + 1)
    assert manager.is_quarantined(c2s) and manager.is_quarantined(c2s + 1)
    assert not manager.in_use(0) and not manager.in_use(LABEL_SPACE)


def test_quarantine_holds_a_pair_until_its_deadline_then_releases_it() -> None:
    manager = LabelManager(quarantine=5.0, c2s_min=17, c2s_max=19)  # 2 pairs
    a, b = manager.allocate(0.0), manager.allocate(0.0)
    assert (a, b) == (17, 19)
    assert manager.next_deadline() is None
    manager.withdraw(17, now=2.0)
    manager.withdraw(19, now=3.0)
    assert manager.next_deadline() == 7.0
    assert manager.on_timer(6.999) == 0
    assert manager.allocate(6.999) is None
    assert manager.on_timer(7.0) == 1
    assert manager.next_deadline() == 8.0
    assert (manager.quarantined_count, manager.free_count) == (1, 1)
    assert manager.allocate(7.5) == 17
    # allocate() releases expired quarantine itself; no on_timer call needed.
    assert manager.allocate(8.0) == 19
    assert manager.next_deadline() is None


def test_release_never_comes_early_when_the_clock_steps_back() -> None:
    manager = LabelManager(quarantine=5.0, c2s_min=17, c2s_max=19)
    manager.allocate(0.0)
    manager.allocate(0.0)
    manager.withdraw(17, now=10.0)
    manager.withdraw(19, now=4.0)  # the caller's clock went back
    assert manager.on_timer(9.0) == 0  # 19 would be due at 9.0, but it queues behind 17
    assert manager.on_timer(15.0) == 2


def test_zero_quarantine_frees_at_once_but_still_behind_other_free_pairs() -> None:
    manager = LabelManager(quarantine=0.0, c2s_min=17, c2s_max=19)
    assert manager.allocate(0.0) == 17
    manager.withdraw(17, now=0.0)
    assert manager.allocate(0.0) == 19
    assert manager.allocate(0.0) == 17


class _KeptArrays(HeapArrays):
    """Arrays that outlive their manager, as a kept state's do: a manager made again over them finds them."""

    def __init__(self) -> None:
        self.made: dict[str, Column] = {}

    def _array(self, name: str, typecode: str, count: int, fill: float) -> Column:
        if name not in self.made:
            self.made[name] = super()._array(name, typecode, count, fill)
        return self.made[name]


def test_a_pair_given_back_is_free_at_once_behind_the_other_free_pairs() -> None:
    """A pair no frame carried (a decision made ahead and not taken) skips the quarantine: free at once, at the tail
    of the free ring, and free again in the state a restarted manager is rebuilt from."""
    store = _KeptArrays()
    manager = LabelManager(quarantine=60.0, c2s_min=17, c2s_max=23, store=store)  # 4 pairs
    assert [manager.allocate(0.0) for _ in range(2)] == [17, 19]
    manager.give_back(17, 1.0)
    assert not manager.in_use(17) and not manager.is_quarantined(17)
    assert (manager.in_use_count, manager.quarantined_count, manager.free_count) == (1, 0, 3)
    assert manager.allocated_total - manager.withdrawn_total == manager.in_use_count
    assert manager.next_deadline() is None  # nothing waits out a quarantine
    with pytest.raises(ValueError, match="not in use"):
        manager.give_back(17, 2.0)
    with pytest.raises(ValueError, match="not a C2S label"):
        manager.give_back(20, 2.0)
    assert [manager.allocate(2.0) for _ in range(3)] == [21, 23, 17]
    assert manager.allocate(2.0) is None
    manager.give_back(21, 3.0)
    adopted = LabelManager(quarantine=60.0, c2s_min=17, c2s_max=23, store=store)
    adopted.restore()
    assert (adopted.in_use_count, adopted.quarantined_count, adopted.free_count) == (3, 0, 1)
    assert adopted.allocate(3.0) == 21


def test_untaken_pairs_leave_the_quarantine_and_nothing_else_moves() -> None:
    """release_untaken frees the quarantined pairs it is given, behind the free ones, and leaves alone a pair in use,
    a free one, an S2C label and a label outside the range."""
    manager = LabelManager(quarantine=60.0, c2s_min=17, c2s_max=25)  # 5 pairs
    assert [manager.allocate(0.0) for _ in range(4)] == [17, 19, 21, 23]
    for c2s in (17, 19):
        manager.withdraw(c2s, 1.0)
    assert manager.release_untaken([17, 21, 25, 20, 99], 2.0) == 1
    assert not manager.is_quarantined(17) and not manager.in_use(17) and manager.is_quarantined(19)
    assert manager.in_use(21) and (manager.in_use_count, manager.quarantined_count, manager.free_count) == (2, 1, 2)
    assert [manager.allocate(3.0), manager.allocate(3.0), manager.allocate(3.0)] == [25, 17, None]
    assert manager.release_untaken([], 4.0) == 0


@pytest.mark.parametrize("label", [18, 16, 15, 10**7, 21])
def test_withdrawing_a_label_not_in_use_raises_and_changes_nothing(label: int) -> None:
    manager = LabelManager(c2s_min=17, c2s_max=21)
    manager.allocate(0.0)  # 17 in use; 18 is its S2C; 21 free
    before = manager.stats()
    with pytest.raises(ValueError):
        manager.withdraw(label, now=0.0)
    assert manager.stats() == before


def test_double_withdraw_raises() -> None:
    manager = LabelManager()
    c2s = manager.allocate(0.0)
    assert c2s is not None
    manager.withdraw(c2s, now=0.0)
    with pytest.raises(ValueError, match="not in use"):
        manager.withdraw(c2s, now=0.0)


def test_stats_snapshot_follows_the_counters() -> None:
    manager = LabelManager(quarantine=1.0, c2s_min=17, c2s_max=21)
    for _ in range(3):
        manager.allocate(0.0)
    manager.withdraw(19, now=0.0)
    manager.allocate(0.5)  # refused: 19 is quarantined
    stats = manager.stats()
    assert stats == LabelStats(
        capacity=3,
        in_use_count=2,
        quarantined_count=1,
        free_count=0,
        peak=3,
        allocated_total=3,
        withdrawn_total=1,
        exhausted=1,
    )
    with pytest.raises(AttributeError):
        stats.peak = 0  # type: ignore[misc]


def test_the_whole_label_space_is_allocated_then_refused_then_reused_after_quarantine() -> None:
    quarantine = 30.0
    manager = LabelManager(quarantine=quarantine)
    seen = bytearray(LABEL_SPACE)
    allocate = manager.allocate
    for _ in range(PAIRS):
        label = allocate(0.0)
        assert label is not None
        seen[label] += 1
    assert seen.count(1) == PAIRS and max(seen) == 1  # all distinct
    assert seen.find(1) == C2S_MIN and seen.rfind(1) == C2S_MAX
    assert all(seen[label] == 0 for label in range(C2S_MIN + 1, C2S_MAX + 2, 2))  # no even C2S
    assert manager.in_use_count == manager.peak == PAIRS

    assert manager.allocate(1.0) is None  # a clean refusal, not an exception
    assert manager.exhausted == 1

    manager.withdraw(12345, now=100.0)
    assert manager.allocate(100.0 + quarantine - 0.001) is None
    assert manager.exhausted == 2
    assert manager.allocate(100.0 + quarantine) == 12345
    assert manager.stats().free_count == 0


# -- the invariants under any sequence of operations --------------------------------------------------------

QUARANTINE = 5.0
SMALL_MIN = 17
SMALL_MAX = 17 + 2 * 40  # 41 pairs: small enough that sequences run out of labels


class LabelLifecycle(RuleBasedStateMachine):
    """Sessions open, close, time passes, timers fire; a reference model predicts every allocation."""

    #: A pair waits at least this long when none is free (:attr:`LabelManager.quarantine_min`).
    quarantine_min = QUARANTINE

    def __init__(self) -> None:
        super().__init__()
        self.manager = LabelManager(
            quarantine=QUARANTINE, quarantine_min=self.quarantine_min, c2s_min=SMALL_MIN, c2s_max=SMALL_MAX
        )
        self.early = 0
        self.now = 0.0
        self.live: set[int] = set()
        self.withdrawn_at: dict[int, float] = {}
        self.model_free: deque[int] = deque(range(SMALL_MIN, SMALL_MAX + 1, 2))
        self.model_quarantine: deque[tuple[int, float]] = deque()

    def _model_release(self) -> int:
        released = 0
        while self.model_quarantine and self.model_quarantine[0][1] <= self.now:
            self.model_free.append(self.model_quarantine.popleft()[0])
            released += 1
        return released

    @rule(count=st.integers(1, 30))
    def open_sessions(self, count: int) -> None:
        # Bursts, so that sequences reach exhaustion and label reuse within a few steps.
        for _ in range(count):
            self._open_one()

    def _open_one(self) -> None:
        label = self.manager.allocate(self.now)
        self._model_release()
        early = False
        if not self.model_free and self.model_quarantine:
            release = self.model_quarantine[0][1]
            if release - QUARANTINE + self.quarantine_min <= self.now:  # none free: the longest waiting, early
                self.model_free.append(self.model_quarantine.popleft()[0])
                early = True
        assert label == (self.model_free.popleft() if self.model_free else None)
        if label is None:
            return
        self.early += early
        assert self.manager.reused_early == self.early
        assert is_c2s(label) and SMALL_MIN <= label <= SMALL_MAX
        assert s2c_of(label) % 2 == 0 and is_s2c(s2c_of(label))
        assert label not in self.live, "two live sessions share a label"
        withdrawn = self.withdrawn_at.get(label)
        if withdrawn is not None:
            assert self.now >= withdrawn + (self.quarantine_min if early else QUARANTINE), (
                "reused inside its quarantine"
            )
        self.live.add(label)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def close_session(self, data: st.DataObject) -> None:
        label = data.draw(st.sampled_from(sorted(self.live)))
        self.manager.withdraw(label, self.now)
        self.live.remove(label)
        self.withdrawn_at[label] = self.now
        self.model_quarantine.append((label, self.now + QUARANTINE))

    @rule(data=st.data())
    def misuse_withdraw(self, data: st.DataObject) -> None:
        # S2C labels, reserved labels, out-of-range labels, free and quarantined pairs: never in use as C2S.
        label = data.draw(st.sampled_from([x for x in range(SMALL_MAX + 4) if x not in self.live]))
        before = self.manager.stats()
        try:
            self.manager.withdraw(label, self.now)
        except ValueError:
            pass
        else:
            raise AssertionError(f"withdrawing {label}, not in use, did not raise")
        assert self.manager.stats() == before

    # Exact and near-miss steps, so that deadlines are hit exactly and just missed.
    @rule(dt=st.one_of(st.sampled_from([QUARANTINE, QUARANTINE - 1e-3, 1e-3]), st.floats(0.0, 2 * QUARANTINE)))
    def advance_time(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        assert self.manager.on_timer(self.now) == self._model_release()

    @invariant()
    def counters_are_consistent(self) -> None:
        m = self.manager
        assert m.in_use_count + m.quarantined_count + m.free_count == m.capacity
        assert m.in_use_count == len(self.live)
        assert m.quarantined_count == len(self.model_quarantine)
        assert m.free_count == len(self.model_free)
        assert m.allocated_total - m.withdrawn_total == m.in_use_count
        assert m.in_use_count <= m.peak <= m.capacity
        expected_deadline = self.model_quarantine[0][1] if self.model_quarantine else None
        assert m.next_deadline() == expected_deadline

    @invariant()
    def live_labels_are_in_use_on_both_members(self) -> None:
        for label in self.live:
            assert self.manager.in_use(label) and self.manager.in_use(label + 1)
        for label, _ in self.model_quarantine:
            assert not self.manager.in_use(label) and self.manager.is_quarantined(label)


LabelLifecycle.TestCase.settings = settings(max_examples=100, stateful_step_count=80, deadline=None)
test_label_lifecycle = LabelLifecycle.TestCase


class LabelLifecycleReusingEarly(LabelLifecycle):
    """The same with a shorter minimum: a pair is reused before its quarantine's end only when none is free, the
    one that has waited longest, and only once it has waited the minimum."""

    quarantine_min = 2.0


LabelLifecycleReusingEarly.TestCase.settings = settings(max_examples=100, stateful_step_count=80, deadline=None)
test_label_lifecycle_reusing_early = LabelLifecycleReusingEarly.TestCase


def test_a_pair_is_reused_early_only_when_none_is_free_and_after_the_minimum() -> None:
    manager = LabelManager(quarantine=60.0, quarantine_min=5.0, c2s_min=17, c2s_max=21)  # 3 pairs
    assert [manager.allocate(0.0) for _ in range(2)] == [17, 19]
    manager.withdraw(17, now=1.0)
    manager.withdraw(19, now=2.0)
    assert manager.allocate(10.0) == 21  # a free pair first: the quarantined ones wait on
    assert manager.free_at(5.9) == 0 and manager.allocate(5.9) is None  # 17 has waited 4.9 s
    assert (manager.exhausted, manager.reused_early) == (1, 0)
    assert manager.free_at(6.0) == 1 and manager.is_quarantined(19)  # 17 released early, 19 still held
    assert manager.allocate(6.0) == 17 and manager.allocate(6.5) is None
    assert manager.allocate(7.0) == 19
    assert manager.stats().reused_early == manager.reused_early == 2
    assert manager.next_deadline() is None and manager.in_use_count == 3


def test_the_quarantines_minimum_defaults_to_the_whole_quarantine_and_is_bounded_by_it() -> None:
    manager = LabelManager(quarantine=5.0, c2s_min=17, c2s_max=17)
    assert manager.quarantine_min == 5.0
    manager.allocate(0.0)
    manager.withdraw(17, now=0.0)
    assert manager.allocate(4.999) is None and manager.allocate(5.0) == 17 and manager.reused_early == 0
    manager.quarantine_min = 0.0
    assert manager.quarantine_min == 0.0
    for bad in (5.001, -1.0, float("nan")):
        with pytest.raises(ValueError, match="quarantine_min"):
            manager.quarantine_min = bad
    assert manager.quarantine_min == 0.0


def test_a_pair_reused_early_keeps_its_place_when_the_rings_are_rebuilt() -> None:
    manager = LabelManager(quarantine=60.0, quarantine_min=1.0, c2s_min=17, c2s_max=19)
    manager.allocate(0.0)
    manager.allocate(0.0)
    manager.withdraw(17, now=0.0)
    manager.withdraw(19, now=0.5)
    assert manager.free_at(1.0) == 1  # 17, early
    manager.restore()
    assert (manager.free_count, manager.quarantined_count, manager.next_deadline()) == (1, 1, 60.5)
    assert manager.allocate(1.0) == 17 and manager.allocate(1.4) is None and manager.allocate(1.5) == 19
