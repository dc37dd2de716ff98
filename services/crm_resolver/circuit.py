"""Per-CRM circuit breakers: fail fast while a CRM is down instead of making callers wait.

What belongs here: the breaker state machine and the registry that keeps one breaker per CRM
URL. What does not: deciding which CRM errors are outages (the resolver does that,
docs/design.md §5: timeouts, unreachable and 5xx only — a "false" or a bad body means the CRM
is up), metrics (the registry reports state changes to listeners; the resolver turns them into
the gauge).

A breaker is told what each attempt says about the CRM, an `Attempt`: UP, DOWN, or UNTESTED
— the attempt ended without testing the CRM, because the call's own time ran out first (a
timeout with less than the CRM's full time, or noticed late by a process that was not
running). UNTESTED changes nothing but the probe: a half-open probe that tested nothing hands
its turn to the next caller. Only what the CRM caused may open a circuit.

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(reset_after elapsed)──▶ half_open
    half_open ──(probe succeeds)──▶ closed
    half_open ──(probe fails)──▶ open

In half_open exactly one probe is let through at a time. A probe that never reports (its
task was cancelled, or the client raised something unexpected) is presumed lost after
`reset_after`, and the next caller may probe, so the breaker can never stick half-open.

Not thread-safe: one event loop owns it, as with everything in the resolver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from shared.outcomes import CircuitState

StateListener = Callable[[str, CircuitState], None]
"""Called with (CRM URL, new state) on every state change."""


class Attempt(Enum):
    """What one CRM attempt says about the CRM: the only thing a breaker is told."""

    UP = "up"
    """The CRM answered, whatever it said (a "false", a 4xx, a bad body): it is up."""
    DOWN = "down"
    """The CRM failed: unreachable, a 5xx, or no answer although it had its full time."""
    UNTESTED = "untested"
    """The call's own time ran out before the CRM's did: nothing is known about the CRM."""


class CircuitBreaker:
    """The breaker for one CRM. `allow()` before a call; report its result after."""

    __slots__ = (
        "_clock",
        "_failures",
        "_on_change",
        "_opened_at",
        "_probe_started",
        "_state",
        "failure_threshold",
        "reset_after",
    )

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_after <= 0:
            raise ValueError("reset_after must be positive")
        self.failure_threshold = failure_threshold
        self.reset_after = reset_after
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started: float | None = None

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose wait is over reads as half_open."""
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.reset_after:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """Whether a call may be made now. In half_open, True means "you are the probe"."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        now = self._clock()
        if self._probe_started is None or now - self._probe_started >= self.reset_after:
            self._probe_started = now
            return True
        return False

    def record(self, attempt: Attempt) -> None:
        """Report what an allowed attempt said about the CRM."""
        if attempt is Attempt.UP:
            self.record_success()
        elif attempt is Attempt.DOWN:
            self.record_failure()
        else:
            self.record_untested()

    def record_success(self) -> None:
        """The CRM answered (whatever it said): it is up."""
        self._failures = 0
        self._probe_started = None
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_untested(self) -> None:
        """The attempt ended without testing the CRM (the call's time ran out first): the
        count of failures and the state stay; a probe's turn passes to the next caller."""
        self._probe_started = None

    def record_failure(self) -> None:
        """The CRM timed out with its full time, was unreachable or answered 5xx."""
        self._probe_started = None
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures < self.failure_threshold:
                return
        # A failed probe re-opens at once; so does a failure reported late by a call that
        # started before the breaker opened (it restarts the wait, which is what we want).
        self._failures = 0
        self._opened_at = self._clock()
        if self._state is not CircuitState.OPEN:
            self._set(CircuitState.OPEN)

    def _set(self, state: CircuitState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)


class BreakerRegistry:
    """One breaker per CRM URL, created on first use; nodes sharing a CRM share its breaker."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_after: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: StateListener | None = None,
    ) -> None:
        self._failure_threshold = failure_threshold
        self._reset_after = reset_after
        self._clock = clock
        self._listeners: list[StateListener] = [] if on_change is None else [on_change]
        self._breakers: dict[str, CircuitBreaker] = {}

    def subscribe(self, listener: StateListener) -> None:
        """Also report state changes to `listener` (the resolver sets its gauge this way)."""
        self._listeners.append(listener)

    def get(self, url: str) -> CircuitBreaker:
        breaker = self._breakers.get(url)
        if breaker is None:
            breaker = CircuitBreaker(
                self._failure_threshold,
                self._reset_after,
                self._clock,
                on_change=lambda state: self._changed(url, state),
            )
            self._breakers[url] = breaker
        return breaker

    def states(self) -> dict[str, CircuitState]:
        """Every known CRM's state, for health pages and tests."""
        return {url: breaker.state for url, breaker in self._breakers.items()}

    def _changed(self, url: str, state: CircuitState) -> None:
        for listener in self._listeners:
            listener(url, state)
