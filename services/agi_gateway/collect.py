"""Collect a customer id as DTMF: prompt, attempts, validation and optional read-back.

One `Channel.collect` per attempt: the caller has the node's `timeout` for the first digit and
its `inter_digit_timeout` between digits; `#` or the node's digit limit ends the entry early.
An attempt with nothing entered, an invalid entry, or a read-back the caller does not confirm
costs one attempt. A hang-up or a prompt that cannot play ends the node (the channel raises).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agi_gateway.channel import Channel
from shared.nodes import NodeConfig

CONFIRM_KEY = "1"


@dataclass(frozen=True, slots=True)
class Collected:
    customer_id: str | None  # the valid entry, or None when the attempts ran out
    last_entry_invalid: bool  # for no_input vs invalid_input
    # time.monotonic() when the caller's last entry (or confirmation) reached the gateway:
    # the CRM budget runs from there.
    entered_at: float = 0.0


async def collect_entry(channel: Channel, node: NodeConfig) -> Collected:
    """Prompt and collect until a valid entry or the attempts run out."""
    last_invalid = False
    for attempt in range(node.attempts):
        if attempt and last_invalid and node.invalid_audio:
            await channel.play(node.invalid_audio)
        entry = await channel.collect(
            node.audio,
            node.max_digits,
            first_digit=node.timeout,
            between_digits=node.inter_digit_timeout,
        )
        digits = entry.digits
        if not digits:
            last_invalid = False
            continue
        if not node.entry_is_valid(digits):
            last_invalid = True
            continue
        entered_at = entry.ended_at
        if node.confirm:
            confirmed, entered_at = await _confirmed(channel, node, digits)
            if not confirmed:
                last_invalid = True
                continue
        return Collected(digits, False, entered_at)
    return Collected(None, last_invalid)


async def _confirmed(channel: Channel, node: NodeConfig, digits: str) -> tuple[bool, float]:
    """Whether the caller pressed 1 after the read-back, and when that reached the gateway."""
    await channel.say_digits(digits)
    key = await channel.read_key(node.confirm_audio, timeout=node.timeout)
    return key == CONFIRM_KEY, time.monotonic()
