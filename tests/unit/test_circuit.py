"""The circuit breaker's state machine and the per-URL registry, on a fake clock."""

from __future__ import annotations

import pytest

from crm_resolver.circuit import Attempt, BreakerRegistry, CircuitBreaker
from shared.outcomes import CircuitState
from tests.fakes import FakeClock


def state(breaker: CircuitBreaker) -> CircuitState:
    # Read through a function: mypy would otherwise keep the narrowed type of `.state`
    # from an earlier assert, though the property changes between reads.
    return breaker.state


def opened(clock: FakeClock, threshold: int = 3) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=threshold, reset_after=5.0, clock=clock)
    for _ in range(threshold):
        breaker.record_failure()
    return breaker


def test_opens_after_threshold_consecutive_failures() -> None:
    """Failures below the threshold keep it closed; the threshold-th opens it and blocks calls."""
    breaker = CircuitBreaker(failure_threshold=3, reset_after=5.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open"
    assert not breaker.allow()


def test_success_resets_the_consecutive_count() -> None:
    """Only consecutive failures count: a success in between starts the count again."""
    breaker = CircuitBreaker(failure_threshold=3, reset_after=5.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"


def test_half_open_after_reset_after_allows_exactly_one_probe() -> None:
    """After reset_after the breaker lets one probe through, and refuses others meanwhile."""
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(4.9)
    assert state(breaker) == "open"
    assert not breaker.allow()
    clock.advance(0.1)
    assert state(breaker) == "half_open"
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()


def test_probe_success_closes() -> None:
    """A successful probe closes the breaker and every caller is allowed again."""
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(5)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.allow()
    assert breaker.allow()


def test_probe_failure_reopens_for_another_full_wait() -> None:
    """A failed probe re-opens at once, and the wait starts again from the failure."""
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(5)
    assert breaker.allow()
    clock.advance(1)
    breaker.record_failure()
    assert state(breaker) == "open"
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()


def test_lost_probe_is_replaced_after_reset_after() -> None:
    """A probe that never reports does not keep the breaker half-open forever."""
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(5)
    assert breaker.allow()
    clock.advance(4.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()


def test_record_tells_up_and_down_apart() -> None:
    """record(DOWN) counts toward opening like record_failure; record(UP) closes a half-open
    breaker like record_success."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=5.0, clock=clock)
    breaker.record(Attempt.DOWN)
    assert state(breaker) == "closed"
    breaker.record(Attempt.DOWN)
    assert state(breaker) == "open"
    clock.advance(5)
    assert breaker.allow()
    breaker.record(Attempt.UP)
    assert state(breaker) == "closed"


def test_untested_attempts_neither_count_nor_reset_the_count() -> None:
    """An attempt that tested nothing (the call's own time ran out) leaves the breaker as it
    was: it does not count as a failure, and does not clear the failures counted so far."""
    breaker = CircuitBreaker(failure_threshold=3, reset_after=5.0, clock=FakeClock())
    breaker.record(Attempt.DOWN)
    breaker.record(Attempt.DOWN)
    for _ in range(10):
        breaker.record(Attempt.UNTESTED)
    assert state(breaker) == "closed"
    breaker.record(Attempt.DOWN)
    assert state(breaker) == "open"


def test_an_untested_probe_lets_the_next_caller_probe_at_once() -> None:
    """A half-open probe that tested nothing keeps the breaker half-open and gives the probe's
    turn to the next caller, without another reset_after wait; an open breaker stays open."""
    clock = FakeClock()
    breaker = opened(clock)
    breaker.record(Attempt.UNTESTED)  # reported late by a call made before it opened
    assert state(breaker) == "open"
    clock.advance(5)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.record(Attempt.UNTESTED)
    assert state(breaker) == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


@pytest.mark.parametrize(("threshold", "reset_after"), [(0, 5.0), (1, 0.0)])
def test_rejects_nonsense_settings(threshold: int, reset_after: float) -> None:
    """A threshold below 1 or a non-positive wait is refused at construction."""
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(failure_threshold=threshold, reset_after=reset_after)


def test_registry_one_breaker_per_url_and_reports_changes() -> None:
    """Same URL, same breaker; each state change is reported once with its URL."""
    clock = FakeClock()
    changes: list[tuple[str, CircuitState]] = []
    registry = BreakerRegistry(failure_threshold=1, reset_after=2.0, clock=clock)
    registry.subscribe(lambda url, state: changes.append((url, state)))
    a = registry.get("http://a/")
    assert registry.get("http://a/") is a
    b = registry.get("http://b/")
    assert b is not a

    a.record_failure()
    a.record_failure()  # already open: no second report
    clock.advance(2)
    assert a.allow()
    a.record_success()
    assert changes == [
        ("http://a/", "open"),
        ("http://a/", "half_open"),
        ("http://a/", "closed"),
    ]
    # The words are the shared vocabulary's members (the metric and logs use the same).
    assert all(type(state) is CircuitState for _, state in changes)
    assert registry.states() == {"http://a/": "closed", "http://b/": "closed"}
