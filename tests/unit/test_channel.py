"""What Asterisk's replies mean (agi_gateway.channel), and entry collection over a scripted
channel: the call flow's logic without a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from agi_gateway.channel import (
    Entry,
    EntryEnd,
    HungUp,
    MaybeHungUp,
    NoSound,
    Refused,
    done_result,
    get_data_result,
    play_result,
    read_result,
)
from agi_gateway.collect import Collected, collect_entry
from agi_gateway.protocol import AgiParser, Reply
from tests.fakes import make_node


def reply(line: str) -> Reply:
    """One reply line through the real parser, as the session would hand it over."""
    parser = AgiParser()
    parser.feed(b"agi_network: yes\n\n")
    (event,) = parser.feed(line.encode() + b"\n")
    assert isinstance(event, Reply)
    return event


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("200 result=1 (12345,OK)", Entry("12345", EntryEnd.COMPLETE)),
        ("200 result=1 (,OK)", Entry("", EntryEnd.COMPLETE)),  # '#' alone
        ("200 result=1 (12,TIMEOUT)", Entry("12", EntryEnd.TIMEOUT)),
        ("200 result=1 (,TIMEOUT)", Entry("", EntryEnd.TIMEOUT)),
        ("200 result=1 (1*2,OK)", Entry("1*2", EntryEnd.COMPLETE)),  # validated later
        ("200 result=1 (,HANGUP)", HungUp()),
        ("200 result=1 (12,HANGUP)", HungUp()),
        ("200 result=1 (,ERROR)", NoSound()),
        ("200 result=1 (,INTERRUPTED)", Refused("200 result=1 (,INTERRUPTED)")),
        ("200 result=1 (,)", Refused("200 result=1 (,)")),
        ("200 result=0", Refused("200 result=0")),
        ("510 Invalid or unknown command", Refused("510 Invalid or unknown command")),
    ],
)
def test_read_status_is_the_whole_story_of_an_entry(line: str, expected: object) -> None:
    """GET FULL VARIABLE "${entry},${READSTATUS}" after Read(): OK and TIMEOUT carry the
    digits, HANGUP and ERROR (prompt missing) end the node, anything else is a refusal."""
    assert read_result(reply(line)) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("200 result=1", Entry("1", EntryEnd.COMPLETE)),
        ("200 result= (timeout)", Entry("", EntryEnd.TIMEOUT)),
        ("200 result=12 (timeout)", Entry("12", EntryEnd.TIMEOUT)),
        ("200 result=-1", MaybeHungUp()),
        ("520 End of proper usage.", Refused("520 End of proper usage.")),
    ],
)
def test_get_data_reply(line: str, expected: object) -> None:
    """GET DATA: digits, `(timeout)`, and the ambiguous -1 (hang-up or missing prompt)."""
    assert get_data_result(reply(line)) == expected


def test_play_and_plain_replies() -> None:
    """STREAM FILE/SAY DIGITS: played, -1 ambiguous, refused; EXEC of a missing app is -2."""
    assert play_result(reply("200 result=0 endpos=8000")) is None
    assert play_result(reply("200 result=-1 endpos=0")) == MaybeHungUp()
    assert isinstance(play_result(reply("510 Invalid or unknown command")), Refused)
    assert done_result(reply("200 result=0")) is None
    assert done_result(reply("200 result=1")) is None
    assert done_result(reply("200 result=-2")) == Refused("200 result=-2")


@dataclass
class ScriptedChannel:
    """A `Channel` that answers `collect` from a list of entries and records every call."""

    entries: list[Entry]
    keys: list[str] = field(default_factory=list)
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._hangup: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def hangup(self) -> asyncio.Future[None]:
        return self._hangup

    @property
    def hung_up(self) -> bool:
        return self._hangup.done()

    def raise_if_broken(self) -> None:
        return None

    async def collect(
        self, prompt: str, max_digits: int, *, first_digit: float, between_digits: float
    ) -> Entry:
        self.calls.append(("collect", prompt, max_digits, first_digit, between_digits))
        return self.entries.pop(0) if self.entries else Entry("", EntryEnd.TIMEOUT)

    async def read_key(self, prompt: str, *, timeout: float) -> str:
        self.calls.append(("read_key", prompt, timeout))
        return self.keys.pop(0) if self.keys else ""

    async def play(self, sound: str) -> None:
        self.calls.append(("play", sound))

    async def say_digits(self, digits: str) -> None:
        self.calls.append(("say_digits", digits))

    async def hold_music(self, on: bool, music_class: str = "default") -> None:
        self.calls.append(("hold_music", on, music_class))

    async def set_variables(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.calls.append(("set_variables", tuple(pairs)))

    async def goto(self, target: str) -> None:
        self.calls.append(("goto", target))


def typed(digits: str) -> Entry:
    return Entry(digits, EntryEnd.COMPLETE)


async def test_collect_asks_with_both_timeouts_and_retries_until_valid() -> None:
    """Each attempt plays the prompt with the node's first-digit and inter-digit timeouts; an
    empty and a too-short entry each cost an attempt, and the invalid-entry sound is played
    only after an invalid one."""
    node = make_node(
        expected_length=5, attempts=3, timeout=4, inter_digit_timeout=1.5, invalid_audio="bad"
    )
    channel = ScriptedChannel([Entry("", EntryEnd.TIMEOUT), Entry("12", EntryEnd.TIMEOUT)])
    channel.entries.append(typed("12345"))
    assert await collect_entry(channel, node) == Collected("12345", False)
    assert channel.calls == [
        ("collect", node.audio, 5, 4, 1.5),
        ("collect", node.audio, 5, 4, 1.5),
        ("play", "bad"),
        ("collect", node.audio, 5, 4, 1.5),
    ]


async def test_attempts_run_out_with_no_input_or_invalid_input() -> None:
    """The last attempt decides: nothing typed is no input, digits that fail a rule invalid."""
    node = make_node(min_length=3, max_length=6, pattern="[1-8]+", attempts=2)
    no_input = ScriptedChannel([typed("12"), Entry("", EntryEnd.TIMEOUT)])
    assert await collect_entry(no_input, node) == Collected(None, False)
    invalid = ScriptedChannel([Entry("", EntryEnd.TIMEOUT), typed("1239")])
    assert await collect_entry(invalid, node) == Collected(None, True)


async def test_confirmation_reads_back_and_needs_key_1() -> None:
    """With `confirm`, the entry is read back and only key 1 accepts it; anything else costs
    an attempt."""
    node = make_node(expected_length=3, attempts=2, confirm=True, timeout=3)
    channel = ScriptedChannel([typed("123"), typed("456")], keys=["2", "1"])
    collected = await collect_entry(channel, node)
    assert (collected.customer_id, collected.last_entry_invalid) == ("456", False)
    assert collected.entered_at > 0  # the budget runs from the confirmation
    assert ("say_digits", "123") in channel.calls
    assert ("read_key", node.confirm_audio, 3) in channel.calls
