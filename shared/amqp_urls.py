"""CALLERID_AMQP_URL: one RabbitMQ URL, or the URLs of the nodes of one cluster, comma-separated.

What belongs here: splitting and checking the setting, and showing a URL without its password.
What does not: connecting (`shared.amqp_link`, which goes through the list in order and moves
on to the next URL when the node it is connected to goes away).

A comma inside a password must be percent-encoded (`%2C`), as any reserved character in a URL.
"""

from __future__ import annotations

from yarl import URL

SETTING = "CALLERID_AMQP_URL"
SCHEMES = ("amqp", "amqps")
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}  # as aiormq fills them in


def split_amqp_urls(value: str) -> tuple[str, ...]:
    """The entries of CALLERID_AMQP_URL, each checked; ValueError naming the bad entry (its
    password hidden)."""
    entries = [entry.strip() for entry in value.split(",")]
    for number, entry in enumerate(entries, 1):
        where = f"entry {number} of {len(entries)}" if len(entries) > 1 else "the URL"
        if not entry:
            raise ValueError(
                f"{where} is empty (a stray comma?): give one amqp:// URL per RabbitMQ node, "
                "comma-separated"
            )
        try:
            url = URL(entry)
            _ = url.port  # yarl checks the port only when asked
        except ValueError as exc:
            raise ValueError(f"{where} ({hide_password(entry)}) is not a URL: {exc}") from None
        if url.scheme not in SCHEMES:
            raise ValueError(
                f"{where} ({hide_password(entry)}) must start with amqp:// or amqps://"
            )
        if not url.host:
            raise ValueError(f"{where} ({hide_password(entry)}) names no host")
    return tuple(entries)


def hide_password(url: str) -> str:
    """The URL as logs and errors may show it: the password replaced by `***`."""
    try:
        parsed = URL(url)
        if parsed.password:
            return str(parsed.with_password("***"))
    except ValueError:
        head, at, tail = url.rpartition("@")
        if at:
            scheme, _, _ = head.partition("://")
            return f"{scheme}://***@{tail}"
    return url


def node_address(url: str) -> str:
    """`host:port` of one entry, for log lines that name a node."""
    parsed = URL(url)
    host = f"[{parsed.host}]" if ":" in (parsed.host or "") else parsed.host
    return f"{host}:{parsed.port or DEFAULT_PORTS.get(parsed.scheme, 5672)}"
