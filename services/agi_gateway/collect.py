"""Collect a customer id as DTMF: prompt, attempts, validation and optional read-back.

One `GET DATA` per attempt: Asterisk plays the prompt, waits `timeout` for the first digit and
ends the entry on `#`, on `max_digits`, or when the channel's digit timeout passes between
digits — which is why the inter-digit timeout is set once per node through `TIMEOUT(digit)`.

`200 result=-1` is ambiguous: a caller who hung up and a prompt file that does not exist both
give it. A hang-up is normally followed by Asterisk's `HANGUP` line, so `CHANNEL STATUS` settles
it: a dead channel answers 511 (raised as CallerHungUp), a live one means the prompt is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from agi_gateway.commands import (
    Answer,
    ChannelStatus,
    Command,
    GetData,
    SayDigits,
    SetVariable,
    StreamFile,
)
from agi_gateway.protocol import Reply
from agi_gateway.session import AgiSession, AgiSessionError, CallerHungUp
from shared.nodes import NodeConfig

# Upper bound for how long a prompt may play before Asterisk answers GET DATA; only there so a
# stuck Asterisk cannot hold the session forever.
PROMPT_ALLOWANCE = 60.0
CONFIRM_KEY = "1"
OK = 200


class PromptMissing(AgiSessionError):
    """Asterisk could not play the node's prompt (the sound file does not exist)."""


class CommandRefused(AgiSessionError):
    """Asterisk answered 510/520 to a command we sent: a gateway bug or an old Asterisk."""


@dataclass(frozen=True, slots=True)
class Collected:
    customer_id: str | None  # the valid entry, or None when the attempts ran out
    last_entry_invalid: bool  # for no_input vs invalid_input
    last_digit_at: float | None  # monotonic time of the last reply carrying digits


async def collect_entry(
    session: AgiSession,
    node: NodeConfig,
    *,
    answer: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> Collected:
    """Prompt and collect until a valid entry or the attempts run out.

    The first prompt goes out in one write with what must precede it (ANSWER when the call is
    new to the gateway, and the inter-digit timeout), so a call starts with one round trip.
    """
    get_data = GetData(node.audio, round(node.timeout * 1000), node.max_digits)
    get_data_limit = node.timeout + node.max_digits * node.inter_digit_timeout + PROMPT_ALLOWANCE
    first: list[Command] = [Answer()] if answer else []
    first.append(SetVariable("TIMEOUT(digit)", f"{node.inter_digit_timeout:g}"))
    last_invalid = False
    last_digit_at: float | None = None
    for attempt in range(node.attempts):
        if attempt and last_invalid and node.invalid_audio:
            await _checked(session, await session.run(StreamFile(node.invalid_audio)))
        batch = [*first, get_data] if attempt == 0 else [get_data]
        replies = await session.run_batch(batch, timeout=get_data_limit)
        digits = await _digits(session, replies[-1])
        if not digits:
            last_invalid = False
            continue
        last_digit_at = clock()
        if not node.entry_is_valid(digits):
            last_invalid = True
            continue
        if node.confirm and not await _confirmed(session, node, digits):
            last_invalid = True
            continue
        return Collected(digits, False, last_digit_at)
    return Collected(None, last_invalid, last_digit_at)


async def _digits(session: AgiSession, reply: Reply) -> str:
    """The digits a GET DATA reply carries ('' for none); raises when there is no entry."""
    await _checked(session, reply)
    return reply.result or ""


async def _checked(session: AgiSession, reply: Reply) -> None:
    if reply.code != OK:
        raise CommandRefused(f"Asterisk refused a command: {reply.text[:60]!r}")
    if reply.result == "-1":
        if session.hung_up:
            raise CallerHungUp("hung up during the prompt")
        await session.run(ChannelStatus())  # 511 here raises CallerHungUp
        if session.hung_up:
            raise CallerHungUp("hung up during the prompt")
        raise PromptMissing("Asterisk could not play the prompt (missing sound file?)")


async def _confirmed(session: AgiSession, node: NodeConfig, digits: str) -> bool:
    await _checked(session, await session.run(SayDigits(digits)))
    reply = await session.run(
        GetData(node.confirm_audio, round(node.timeout * 1000), 1),
        timeout=node.timeout + PROMPT_ALLOWANCE,
    )
    return await _digits(session, reply) == CONFIRM_KEY
