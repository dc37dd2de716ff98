"""Who may hold a FastAGI session, and how many at once: the gateway's front door.

Only Asterisk has reason to talk FastAGI to the gateway, and a session costs a call slot, a
socket and memory; anyone else who reaches the port could hold them. So:

- `CALLERID_AGI_ALLOWED_PEERS` (CIDRs): a connection from elsewhere is closed at accept, before
  anything is read, counted (`callerid_agi_sessions_rejected_total{reason="peer_not_allowed"}`)
  and logged at most once a minute. Unset admits any peer (one WARNING at start-up).
- `CALLERID_AGI_MAX_CALLS_PER_PEER`: live sessions one address may hold, so one peer cannot
  take every slot of `CALLERID_MAX_CALLS`.
- A connection holds no call slot until its whole environment block has arrived (the server
  decides capacity then), and it is dropped when the environment takes longer than
  `CALLERID_ENVIRONMENT_TIMEOUT`.

What does not belong here: what a refused call is told (the server and the flow answer it
with the gateway-wide fallback), and anything about the AGI protocol.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two log lines about refused peers


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) as networks; ValueError naming the bad entry."""
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{value.strip()!r} is not an address or CIDR: {exc}") from None
    return tuple(networks)


def peer_host(peername: object) -> str | None:
    """The address part of a transport's `peername` (None for a socket without one)."""
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        return peername[0]
    return None


class Admission:
    """Decides, per connection, whether it may hold a session; counts live ones per peer.

    `admit(host)` returns None when the connection may go on (and counts it until `leave`),
    or the refusal reason: `peer_not_allowed` or `peer_limit`.
    """

    def __init__(
        self,
        allowed: tuple[Network, ...] = (),
        *,
        max_per_peer: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowed = allowed
        self._max_per_peer = max_per_peer  # 0: no cap beyond the server's own
        self._live: Counter[str] = Counter()
        self._clock = clock
        self._refused_since_log = 0
        self._last_log: float | None = None

    @property
    def open_to_all(self) -> bool:
        return not self._allowed

    def allowed(self, host: str | None) -> bool:
        if not self._allowed:
            return True
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers this way
        return any(address in network for network in self._allowed)

    def admit(self, host: str | None) -> str | None:
        if not self.allowed(host):
            self._note_refusal(host)
            return "peer_not_allowed"
        key = host or "-"
        if self._max_per_peer and self._live[key] >= self._max_per_peer:
            return "peer_limit"
        self._live[key] += 1
        return None

    def leave(self, host: str | None) -> None:
        key = host or "-"
        self._live[key] -= 1
        if self._live[key] <= 0:
            del self._live[key]

    def _note_refusal(self, host: str | None) -> None:
        """One WARNING a minute at most, however many connections are refused."""
        self._refused_since_log += 1
        now = self._clock()
        if self._last_log is not None and now - self._last_log < REFUSAL_LOG_INTERVAL:
            return
        log.warning(
            "FastAGI connection from %s refused: not in CALLERID_AGI_ALLOWED_PEERS "
            "(%d refused since the last such line)",
            host or "an unknown address",
            self._refused_since_log,
        )
        self._refused_since_log = 0
        self._last_log = now
