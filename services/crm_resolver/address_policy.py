"""Where the resolver may send CRM requests: schemes, an optional host allow-list, and the
addresses it never connects to unless told to. No I/O except through the wrapped resolver.

A node's URL is configuration, but configuration can be wrong or tampered with (an
OMniLeads Redis hash is writable by whoever reaches that Redis), and a request to a cloud
metadata service from inside a cluster hands out credentials. So, at every lookup:

- the URL must be http:// or https:// (checked at config load too);
- with an allow-list (`CALLERID_CRM_ALLOWED_HOSTS`), its host must be on it: an exact name
  or IP, or "*.example.com" for any name under example.com;
- link-local and cloud metadata addresses are refused unless `CALLERID_CRM_ALLOW_METADATA`
  is set: 169.254.0.0/16 and fe80::/10 (AWS, GCP, Azure, OpenStack metadata live there),
  fd00:ec2::254 (AWS over IPv6), 100.100.100.200 (Alibaba), 168.63.129.16 (Azure
  WireServer), plus unspecified and multicast addresses, IPv4-mapped and NAT64 forms of all
  of them, and the well-known metadata host names (metadata.google.internal ...).

The address check runs on the addresses the connection will actually use: `PolicyResolver`
wraps aiohttp's resolver, so a name that resolves (or is rebound) to a metadata address is
refused at connect time, not only a URL that spells one. An IP literal in a URL is not
resolved by the HTTP client (`http1`), so `check_url` checks it. Loopback and private
(RFC 1918) addresses stay allowed: CRMs often live on the internal network, and the tests'
mock CRM is on 127.0.0.1.

Every refusal is `AddressRefused` (an OSError: the HTTP client carries it as the cause of
its `NameNotResolved`); `crm_http` turns it into `CrmUnreachable`.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

_SCHEMES = frozenset({"http", "https"})
METADATA_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",  # IPv4 link-local: AWS/GCP/Azure/OpenStack/DigitalOcean metadata
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "168.63.129.16/32",  # Azure WireServer
        "0.0.0.0/8",  # "this network": reaches the local host by surprise
        "::/128",
        "224.0.0.0/4",  # multicast
        "ff00::/8",
    )
)
METADATA_NAMES = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(OSError):
    """The policy forbids this CRM URL, host or address; the message says which rule."""


def _normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_metadata_address(text: str) -> bool:
    """Whether `text` (an IP address, optionally with a %zone) is one the policy refuses."""
    address = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None and is_metadata_address(str(embedded)):
            return True
    return any(address in net for net in METADATA_NETWORKS if net.version == address.version)


@dataclass(frozen=True)
class AddressPolicy:
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    """Empty: any host. Otherwise exact names/IPs, or "*.domain" for names under domain."""
    allow_metadata: bool = False
    """Let link-local and cloud metadata addresses through (only for a CRM that truly is
    link-local; never needed in the cloud)."""

    @classmethod
    def from_settings(cls, allowed_hosts: Iterable[str], allow_metadata: bool) -> AddressPolicy:
        return cls(frozenset(_normal_host(h) for h in allowed_hosts if h.strip()), allow_metadata)

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        name = _normal_host(host)
        if name in self.allowed_hosts:
            return True
        return any(
            entry.startswith("*.") and name.endswith(entry[1:]) for entry in self.allowed_hosts
        )

    def check_url(self, url: str) -> None:
        """AddressRefused unless the URL's scheme, host and (for an IP literal) address pass."""
        refusal = _url_refusal(self, url)
        if refusal is not None:
            raise AddressRefused(refusal)

    def check_address(self, host: str, address: str) -> None:
        if not self.allow_metadata and is_metadata_address(address):
            raise AddressRefused(
                f"{host[:80]!r} resolves to {address}, a link-local or metadata address"
            )


# Every lookup checks its node's URL: the verdict is kept per policy and URL (a few nodes).
@functools.lru_cache(maxsize=1024)
def _url_refusal(policy: AddressPolicy, url: str) -> str | None:
    """Why `policy` refuses `url`, or None."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "not a valid URL"
    if parsed.scheme not in _SCHEMES:
        return f"scheme {parsed.scheme[:10]!r} is not http or https"
    host = parsed.host
    if not host:
        return "URL has no host"
    if not policy.host_allowed(host):
        return f"host {host[:80]!r} is not in CALLERID_CRM_ALLOWED_HOSTS"
    if policy.allow_metadata:
        return None
    if _normal_host(host) in METADATA_NAMES:
        return f"host {host[:80]!r} is a cloud metadata service"
    try:
        literal = is_metadata_address(host)
    except ValueError:
        return None  # a name: its addresses are checked when it is resolved
    if literal:
        return f"address {host[:80]} is link-local or a metadata service"
    return None


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that refuses names resolving to any address the policy forbids.

    All of a name's addresses must pass: a name that answers with a metadata address among
    others is not a CRM, whatever else it answers with (DNS rebinding)."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if not self._policy.allow_metadata and _normal_host(host) in METADATA_NAMES:
            raise AddressRefused(f"host {host[:80]!r} is a cloud metadata service")
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check_address(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()
