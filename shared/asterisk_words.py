"""Names the gateway hands to Asterisk that come from configuration: one rule for each, used
both when a node is validated (`shared.nodes`) and when the AGI command is built
(`agi_gateway.commands`), so a node that loads can never hold a value a command would refuse
in the middle of a call.

- A sound name (prompt, confirmation, invalid-entry sound): path segments of letters, digits,
  `_`, `-` (and `.` after the first segment), no `.`/`..` segment, no extension needed, at most
  255 characters (res_agi reads a whole command into 2,048 bytes).
- A music-on-hold class: letters, digits, `_`, `-`, at most 80 characters.

Nothing here may allow a space, quote, backslash, comma, `&` (Read()'s list of prompts) or a
line break: they would change how Asterisk splits the command or the application's argument.
"""

from __future__ import annotations

import re

SOUND = re.compile(r"[A-Za-z0-9_\-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9_\-.]+)*")
MAX_SOUND = 255
MUSIC_CLASS = re.compile(r"[A-Za-z0-9_\-]+")
MAX_MUSIC_CLASS = 80


def is_sound(value: str) -> bool:
    return len(value) <= MAX_SOUND and SOUND.fullmatch(value) is not None


def is_music_class(value: str) -> bool:
    return len(value) <= MAX_MUSIC_CLASS and MUSIC_CLASS.fullmatch(value) is not None
