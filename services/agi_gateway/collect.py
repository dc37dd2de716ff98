"""Collect a customer id as DTMF: prompt, attempts, validation and optional read-back.

One `Channel.collect` per attempt: the caller has the node's `timeout` for the first digit and
its `inter_digit_timeout` between digits; `#` or the node's digit limit ends the entry early.
An attempt with nothing entered, an invalid entry, or a read-back the caller does not confirm
costs one attempt. A hang-up or a prompt that cannot play ends the node (the channel raises).
"""

from __future__ import annotations

from dataclasses import dataclass

from agi_gateway.channel import Channel
from shared.nodes import NodeConfig

CONFIRM_KEY = "1"


@dataclass(frozen=True, slots=True)
class Collected:
    customer_id: str | None  # the valid entry, or None when the attempts ran out
    last_entry_invalid: bool  # for no_input vs invalid_input


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
        if node.confirm and not await _confirmed(channel, node, digits):
            last_invalid = True
            continue
        return Collected(digits, False)
    return Collected(None, last_invalid)


async def _confirmed(channel: Channel, node: NodeConfig, digits: str) -> bool:
    await channel.say_digits(digits)
    return await channel.read_key(node.confirm_audio, timeout=node.timeout) == CONFIRM_KEY
