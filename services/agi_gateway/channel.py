"""What a call asks of its Asterisk channel, and what Asterisk's answers mean.

The call flow, entry collection and routing depend on `Channel`, a small protocol of the few
operations they use; `AgiChannel` implements it over one FastAGI session, one command per
round trip. What a reply means lives here and nowhere else: the pure `*_result` functions turn
replies into typed results, and `AgiChannel` turns the results that end a node (the caller
hung up, a prompt cannot play, Asterisk refused a command) into exceptions. A unit test can
hand the flow a small scripted fake instead.

Asterisk 22's answers, as read in its source (res/res_agi.c, apps/app_read.c, main/app.c) and
checked on the wire against a real Asterisk 22.10.1 by the tests in tests/asterisk/:

- An entry is collected with `EXEC Read`, not `GET DATA`: GET DATA has one timeout for the
  first digit and between digits (`ast_app_getdata_full`), while Read() with no timeout of its
  own waits TIMEOUT(response) for the first digit and TIMEOUT(digit) between digits. Read()
  answers `200 result=0` whatever happened (also on a hang-up) and leaves the digits in a
  variable and the reason it stopped in READSTATUS: `OK` (max digits, or `#`), `TIMEOUT`,
  `HANGUP`, `ERROR` (the prompt could not be played: nothing was read). One
  `GET FULL VARIABLE` then reads both; it works on a hung-up channel too.
- `200 result=-1` from GET DATA, STREAM FILE or SAY DIGITS means either "the caller hung up"
  or "the sound file is missing". A hang-up is followed by Asterisk's `HANGUP` line; if none
  came, `CHANNEL STATUS` settles it (511 on a dead channel).
- `SAY DIGITS` with missing digit sounds answers `200 result=0` and plays nothing; that cannot
  be seen from here (Debian's asterisk-core-sounds-en has the digits).
- `EXEC` of an application Asterisk does not have answers `200 result=-2`.

Exception tree (the flow's view of a channel):

    AgiSessionError             (session)
    ├── CallerHungUp            (session) the channel is gone
    ├── PromptMissing           a sound file the node names cannot be played
    └── CommandRefused          Asterisk refused a command (510/520, unknown application)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from agi_gateway.commands import (
    ChannelStatus,
    Command,
    Exec,
    GetData,
    GetFullVariable,
    MultiSet,
    ReadDigits,
    SayDigits,
    SetMusic,
    StreamFile,
)
from agi_gateway.protocol import Reply
from agi_gateway.session import AgiSession, AgiSessionError, CallerHungUp

# The channel variable Read() leaves the digits in. Not inherited (no "__"): the validated
# entry reaches the agent's leg as OML_CUSTOMER_ID / OMLCODCLI, a rejected one never does.
ENTRY_VARIABLE = "CALLERID_ENTRY"


# A node's commands are the same on every call: built (and checked) once, not per call.
@functools.lru_cache(maxsize=1024)
def _set_timeouts(first_digit: float, between_digits: float) -> MultiSet:
    return MultiSet(
        [("TIMEOUT(response)", f"{first_digit:.3f}"), ("TIMEOUT(digit)", f"{between_digits:.3f}")]
    )


@functools.lru_cache(maxsize=1024)
def _read_entry(prompt: str, max_digits: int) -> ReadDigits:
    return ReadDigits(ENTRY_VARIABLE, prompt, max_digits)


_READ_RESULT = GetFullVariable(f"${{{ENTRY_VARIABLE}}},${{READSTATUS}}")
OK = 200
_APP_MISSING = "-2"
# Upper bound for how long a sound may play before Asterisk answers; only there so a stuck
# Asterisk cannot hold the session forever.
PLAY_ALLOWANCE = 60.0


class PromptMissing(AgiSessionError):
    """Asterisk could not play a sound the node names (the file does not exist)."""


class CommandRefused(AgiSessionError):
    """Asterisk refused a command we sent: a gateway bug, or an Asterisk without Read()."""


class EntryEnd(Enum):
    COMPLETE = "complete"  # max digits reached, or the caller pressed '#'
    TIMEOUT = "timeout"  # no first digit in time, or a pause between digits too long


@dataclass(frozen=True, slots=True)
class Entry:
    digits: str  # as typed, '' for nothing; not yet validated
    ended: EntryEnd
    ended_at: float = 0.0  # time.monotonic() when Asterisk's reply ending the entry arrived


@dataclass(frozen=True, slots=True)
class HungUp:
    """The caller hung up during the command."""


@dataclass(frozen=True, slots=True)
class NoSound:
    """The sound could not be played (missing file); the channel is still up."""


@dataclass(frozen=True, slots=True)
class MaybeHungUp:
    """`200 result=-1`: a hang-up or a missing sound file; `CHANNEL STATUS` tells which."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Asterisk refused the command; `text` is its reply, for the log."""

    text: str


ReadResult = Entry | HungUp | NoSound | Refused
GetDataResult = Entry | MaybeHungUp | Refused
PlayResult = None | MaybeHungUp | Refused  # None: it played


def read_result(reply: Reply, ended_at: float = 0.0) -> ReadResult:
    """The answer to `GET FULL VARIABLE "${<entry>},${READSTATUS}"` after `EXEC Read`; an
    entry ended at `ended_at` (when Read's own reply arrived)."""
    if reply.code != OK or reply.result != "1" or reply.data is None:
        return Refused(reply.text)
    digits, _, status = reply.data.rpartition(",")
    if status == "OK":
        return Entry(digits, EntryEnd.COMPLETE, ended_at)
    if status == "TIMEOUT":
        return Entry(digits, EntryEnd.TIMEOUT, ended_at)
    if status == "HANGUP":
        return HungUp()
    if status == "ERROR":
        return NoSound()
    # INTERRUPTED, SKIPPED or nothing at all: Read() did not run the way the gateway asked.
    return Refused(reply.text)


def get_data_result(reply: Reply) -> GetDataResult:
    """The answer to `GET DATA`: digits (`(timeout)` when a timeout ended the entry)."""
    if reply.code != OK:
        return Refused(reply.text)
    if reply.result == "-1":
        return MaybeHungUp()
    ended = EntryEnd.TIMEOUT if reply.data == "timeout" else EntryEnd.COMPLETE
    return Entry(reply.result or "", ended)


def play_result(reply: Reply) -> PlayResult:
    """The answer to `STREAM FILE` or `SAY DIGITS` (no escape digits)."""
    if reply.code != OK:
        return Refused(reply.text)
    if reply.result == "-1":
        return MaybeHungUp()
    return None


def done_result(reply: Reply) -> Refused | None:
    """The answer to a command that either worked (`200 result=0|1`) or was refused."""
    if reply.code != OK or reply.result == _APP_MISSING:
        return Refused(reply.text)
    return None


class Channel(Protocol):
    """The operations a call flow needs from the channel it runs on."""

    @property
    def hangup(self) -> asyncio.Future[None]:
        """Done once the caller is gone; a flow races long waits (the CRM) against it."""

    @property
    def hung_up(self) -> bool: ...

    def raise_if_broken(self) -> None:
        """Raise if the peer broke the protocol (then `hangup` is done as well)."""

    async def collect(
        self, prompt: str, max_digits: int, *, first_digit: float, between_digits: float
    ) -> Entry:
        """Play `prompt` and collect up to `max_digits` digits; `#` ends the entry early."""

    async def read_key(self, prompt: str, *, timeout: float) -> str:
        """Play `prompt` and return one key ('' for none within `timeout`)."""

    async def play(self, sound: str) -> None:
        """Play a sound to the end (no key interrupts it)."""

    async def say_digits(self, digits: str) -> None: ...

    async def hold_music(self, on: bool, music_class: str = "default") -> None: ...

    async def set_variables(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Set channel variables, in order, with one command."""

    async def goto(self, target: str) -> None:
        """Continue the dialplan at `context,extension,priority` once the AGI ends."""


class AgiChannel:
    """`Channel` over one FastAGI session: one command, then its reply, then the next."""

    def __init__(self, session: AgiSession) -> None:
        self._session = session
        self._timeouts: tuple[float, float] | None = None  # what the channel has now

    @property
    def hangup(self) -> asyncio.Future[None]:
        return self._session.hangup

    @property
    def hung_up(self) -> bool:
        return self._session.hung_up

    def raise_if_broken(self) -> None:
        self._session.raise_if_broken()

    async def collect(
        self, prompt: str, max_digits: int, *, first_digit: float, between_digits: float
    ) -> Entry:
        timeouts = (first_digit, between_digits)
        if timeouts != self._timeouts:  # once per node: later attempts reuse them
            await self._done(_set_timeouts(first_digit, between_digits))
            self._timeouts = timeouts
        limit = first_digit + max_digits * between_digits + PLAY_ALLOWANCE
        await self._done(_read_entry(prompt, max_digits), timeout=limit)
        ended_at = self._session.replied_at
        result = read_result(await self._session.run(_READ_RESULT), ended_at)
        if isinstance(result, Entry):
            return result
        if isinstance(result, HungUp):
            raise CallerHungUp("hung up during the entry")
        if isinstance(result, NoSound):
            raise PromptMissing(f"Asterisk could not play {prompt!r} (missing sound file?)")
        raise CommandRefused(f"Read() did not run as asked: {result.text[:60]!r}")

    async def read_key(self, prompt: str, *, timeout: float) -> str:
        reply = await self._session.run(
            GetData(prompt, round(timeout * 1000), 1), timeout=timeout + PLAY_ALLOWANCE
        )
        result = get_data_result(reply)
        if isinstance(result, Entry):
            return result.digits
        if isinstance(result, MaybeHungUp):
            await self._settle_minus_one(prompt)
        raise CommandRefused(f"Asterisk refused GET DATA: {reply.text[:60]!r}")

    async def play(self, sound: str) -> None:
        await self._played(StreamFile(sound), sound)

    async def say_digits(self, digits: str) -> None:
        await self._played(SayDigits(digits), "digits")

    async def hold_music(self, on: bool, music_class: str = "default") -> None:
        await self._done(SetMusic(on, music_class))

    async def set_variables(self, pairs: Sequence[tuple[str, str]]) -> None:
        await self._done(MultiSet(pairs))

    async def goto(self, target: str) -> None:
        await self._done(Exec("Goto", target))

    async def _played(self, command: Command, sound: str) -> None:
        reply = await self._session.run(command, timeout=PLAY_ALLOWANCE)
        result = play_result(reply)
        if isinstance(result, MaybeHungUp):
            await self._settle_minus_one(sound)
        elif isinstance(result, Refused):
            raise CommandRefused(f"Asterisk refused {command.name}: {result.text[:60]!r}")

    async def _done(self, command: Command, *, timeout: float | None = None) -> None:
        result = done_result(await self._session.run(command, timeout=timeout))
        if result is not None:
            raise CommandRefused(f"Asterisk refused {command.name}: {result.text[:60]!r}")

    async def _settle_minus_one(self, sound: str) -> None:
        """After `result=-1`: raise CallerHungUp if the channel is gone, else PromptMissing."""
        if not self._session.hung_up:
            await self._session.run(ChannelStatus())  # 511 here raises CallerHungUp
        if self._session.hung_up:
            raise CallerHungUp("hung up while a sound played")
        raise PromptMissing(f"Asterisk could not play {sound!r} (missing sound file?)")
