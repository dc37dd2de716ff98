"""How Asterisk splits a command line (res_agi parse_args) and an application's argument
(app_separate_args).

Part of the simulated Asterisk; the package docstring (tools/asterisk_sim/__init__.py) says
what it reproduces and where each behaviour was checked in Asterisk's source.
"""

from __future__ import annotations

import re

# With no backslash in the line, parse_args reduces to this: a word is a run of characters
# other than space and tab, where a double-quoted stretch (possibly left open) may hold them.
_PLAIN_WORD = re.compile(r'(?:"[^"]*+"?|[^ \t"]++)++')


def parse_args(line: str) -> tuple[list[str], bool]:
    """Split a command line as res_agi's parse_args does; also say if a quote or escape is
    left open (Asterisk accepts that silently, which is how injected text goes unnoticed)."""
    if "\\" in line:
        return _parse_args_by_char(line)
    words = [word.replace('"', "") for word in _PLAIN_WORD.findall(line)]
    return words, line.count('"') % 2 == 1


def _parse_args_by_char(line: str) -> tuple[list[str], bool]:
    """parse_args one character at a time, as res_agi.c does it (lines with a backslash)."""
    words: list[list[str]] = []
    quoted = escaped = False
    whitespace = True
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                words.append([])
                whitespace = False
            continue
        if char in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            words.append([])
            whitespace = False
        words[-1].append(char)
        escaped = False
    return ["".join(word) for word in words], quoted or escaped


def app_separate_args(data: str, delim: str, limit: int) -> list[str]:
    """Split an application's argument as Asterisk's __ast_app_separate_args does with
    remove_chars set (AST_STANDARD_APP_ARGS, AST_NONSTANDARD_APP_ARGS).

    `delim` separates, except inside parentheses, brackets or double quotes; quotes are
    removed; a backslash is removed and the character after it kept as it is. At most `limit`
    parts: the last one takes the rest of the text unsplit and untouched. A delimiter at the
    very end makes one more, empty, part.
    """
    if not _APP_ARG_SPECIAL.search(data):  # nothing groups or escapes: a plain split
        return data.split(delim, limit - 1) if data else []
    if delim in _APP_ARG_GROUPED and not _APP_ARG_REMOVED.search(data):
        return _app_separate_args_grouped(data, delim, limit)
    return _app_separate_args_by_char(data, delim, limit)


_APP_ARG_SPECIAL = re.compile(r'[()\[\]"\\]')
_APP_ARG_REMOVED = re.compile(r'["\\]')
# For each delimiter, what the grouped split has to look at: the delimiter and the groupers.
_APP_ARG_GROUPED = {delim: re.compile(rf"[()\[\]{delim}]") for delim in (",", "=", "|")}


def _app_separate_args_grouped(data: str, delim: str, limit: int) -> list[str]:
    """app_separate_args for an argument with parentheses or brackets but no quote or
    backslash (nothing to remove): the same cuts as the character loop, found by a regex."""
    parts: list[str] = []
    start = paren = bracket = 0
    if limit > 1:
        for match in _APP_ARG_GROUPED[delim].finditer(data):
            char = match.group()
            if char == "(":
                paren += 1
            elif char == ")":
                paren -= 1 if paren else 0
            elif char == "[":
                bracket += 1
            elif char == "]":
                bracket -= 1 if bracket else 0
            elif not (paren or bracket):
                parts.append(data[start : match.start()])
                start = match.end()
                if len(parts) == limit - 1:
                    break
    parts.append(data[start:])
    return parts


def _app_separate_args_by_char(data: str, delim: str, limit: int) -> list[str]:
    """app_separate_args one character at a time, as Asterisk's C loop does it."""
    parts: list[str] = []
    index, end = 0, len(data)
    paren = bracket = 0
    quoted = ended_by_delim = False
    while index < end and len(parts) < limit - 1:
        part: list[str] = []
        ended_by_delim = False
        while index < end:
            char = data[index]
            index += 1
            if char == "(":
                paren += 1
            elif char == ")":
                paren -= 1 if paren else 0
            elif char == "[":
                bracket += 1
            elif char == "]":
                bracket -= 1 if bracket else 0
            elif char == '"' and delim != '"':
                quoted = not quoted
                continue
            elif char == "\\":
                # Asterisk steps past the next character without looking at it; a backslash
                # at the very end is simply dropped here (C reads past the string there).
                if index < end:
                    part.append(data[index])
                    index += 1
                continue
            elif char == delim and not (paren or quoted or bracket):
                ended_by_delim = True
                break
            part.append(char)
        parts.append("".join(part))
    if index < end:
        parts.append(data[index:])
    elif ended_by_delim:
        parts.append("")
    return parts
