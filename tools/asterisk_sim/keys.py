"""A scripted entry's keys and pauses, and how Asterisk's timeouts read them.

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from tools.asterisk_sim.script import (
    GETDATA_COMPLETE,
    GETDATA_EMPTY_END_TERMINATED,
    GETDATA_FAILED,
    GETDATA_TIMEOUT,
)


class Keys(NamedTuple):
    """One scripted entry: each key with the pause before it (s), and the pause after the last."""

    keys: tuple[tuple[float, str], ...]
    trailing: float

    @property
    def duration(self) -> float:
        """From the end of the prompt to the end of the trailing pause, in seconds."""
        return sum(pause for pause, _ in self.keys) + self.trailing


_PAUSE = re.compile(r"\((\d+(?:\.\d*)?|\.\d+)\)")


@functools.lru_cache(maxsize=1024)
def parse_entry(entry: str | None) -> Keys:
    """The keys of one `CallScript.entries` item (see the module docstring for the notation).

    Never fails: a "(" that does not start a pause such as "(2.5)" is a key like any other.
    """
    if not entry:
        return Keys((), 0.0)
    if entry.endswith("~"):
        entry = entry[:-1]
    keys: list[tuple[float, str]] = []
    pause = 0.0
    index, end = 0, len(entry)
    while index < end:
        char = entry[index]
        if char == "(" and (match := _PAUSE.match(entry, index)):
            pause += float(match.group(1))
            index = match.end()
            continue
        keys.append((pause, char))
        pause = 0.0
        index += 1
    return Keys(tuple(keys), pause)


def read_keys(
    entry: Keys,
    first: float,
    between: float,
    max_digits: int,
    enders: str,
    hangup_at: float | None = None,
) -> tuple[int, str, float]:
    """ast_readstring_full (main/channel.c) against the caller's keys, no I/O.

    `first` is the first-digit timeout and `between` the one after each digit, `hangup_at`
    when the caller hangs up, all in seconds from the end of the prompt. A key exactly at the
    timeout is too late. Returns (GETDATA_* result, digits, seconds taken).
    """
    digits = ""
    now = 0.0
    wait = first
    for pause, key in entry.keys:
        if hangup_at is not None and hangup_at < now + min(pause, wait):
            return GETDATA_FAILED, digits, hangup_at
        if pause >= wait:
            return GETDATA_TIMEOUT, digits, now + wait
        now += pause
        if key in enders:
            result = GETDATA_COMPLETE if digits else GETDATA_EMPTY_END_TERMINATED
            return result, digits, now
        digits += key
        if len(digits) >= max_digits:
            return GETDATA_COMPLETE, digits, now
        wait = between
    if hangup_at is not None and hangup_at < now + wait:
        return GETDATA_FAILED, digits, max(hangup_at, now)
    return GETDATA_TIMEOUT, digits, now + wait


_C_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?\d+)")
_C_DOUBLE = re.compile(r"[ \t\n\v\f\r]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign, digits; 0 when there are none."""
    match = _C_INT.match(text)
    return int(match.group(1)) if match else 0


def _atof(text: str) -> float:
    """C's atof for plain decimal numbers (no hex, inf or nan); 0.0 when there is none."""
    match = _C_DOUBLE.match(text)
    return float(match.group(1)) if match else 0.0


@functools.lru_cache(maxsize=256)
def timeout_ms(value: str) -> int:
    """What func_timeout's timeout_write makes of `value` for TIMEOUT(response|digit), in ms.

    sscanf(value, "%ld%lf", &sec, &x): whole seconds, then the rest as a double (".5" of
    "3.5"); no number or a negative one gives 0; then sec * 1000 + (long)(x * 1e6) / 1000.
    """
    whole = _C_INT.match(value)
    if whole is None or int(whole.group(1)) < 0:
        return 0
    fraction = _C_DOUBLE.match(value, whole.end())
    usec = int(float(fraction.group(1)) * 1_000_000) if fraction else 0
    return int(whole.group(1)) * 1000 + (abs(usec) // 1000) * (1 if usec >= 0 else -1)
