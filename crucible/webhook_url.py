"""Where a webhook may go: URL syntax, and an address policy against SSRF.

Two checks, both at submit (a 422) and again at every delivery (DNS may have changed):
- syntax (`check_url_syntax`): http or https, a host, no user:password, no fragment;
- address (`resolve_target`): the host is resolved and every address it resolves to must
  be public (`is_global`, not multicast); private, loopback, link-local (169.254.169.254,
  the cloud metadata service, included), CGNAT, reserved and unspecified addresses are
  refused unless `CRUCIBLE_WEBHOOK_ALLOWED_HOSTS` allows them (a CIDR such as
  `127.0.0.1/32`, or a host name, compared exactly). IPv4-mapped IPv6 addresses are judged
  as the IPv4 address they carry.

The delivery connects to the very address checked here (`WebhookTarget.ip`), never to a
name resolved again, so DNS rebinding between check and connect is not possible.
Torch-free; imports nothing of the spec.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from crucible.errors import CrucibleError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to; socket.getaddrinfo by default.
Resolver = Callable[[str, int], Sequence[str]]

FORBIDDEN = "webhook_url_forbidden"


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the address to connect to."""

    url: str
    scheme: str
    host: str  # as written (lowercase), for the Host header and TLS server name
    port: int
    target: str  # path and query, what goes on the request line
    ip: str  # the checked address the delivery connects to

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the host name."""
        literal = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.scheme}://{literal}:{self.port}{self.target}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


def check_url_syntax(url: str) -> SplitResult:
    """The URL split; ValueError naming the problem (the spec validator's message)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a malformed or out-of-range port
    except ValueError as exc:
        raise ValueError(f"malformed URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the webhook URL must be http:// or https://")
    if parts.username is not None or parts.password is not None:
        # Credentials would be stored and shown in clear; the secret signs instead.
        raise ValueError("the webhook URL must not carry credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("the webhook URL has no host")
    if parts.fragment:
        raise ValueError("the webhook URL must not have a #fragment")
    if port == 0:
        raise ValueError("the webhook URL has port 0")
    return parts


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _normalised(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _allowed_by_settings(host: str, ip: IPAddress, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        entry = entry.strip()
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if entry.lower().rstrip(".") == host:
                return True
            continue
        if ip.version == network.version and ip in network:
            return True
    return False


def _is_public(ip: IPAddress) -> bool:
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def resolve_target(
    url: str, allowed_hosts: Sequence[str], resolver: Resolver | None = None
) -> WebhookTarget:
    """Check `url` and pick the address to connect to; CrucibleError(webhook_url_forbidden)
    naming the problem otherwise. Every address the name resolves to must pass, so a name
    with one public and one private address is refused."""
    try:
        parts = check_url_syntax(url)
    except ValueError as exc:
        raise CrucibleError(FORBIDDEN, f"webhook.url: {exc}", {"field": "webhook.url"}) from None
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = list((resolver or _system_resolver)(host, port))
        except (OSError, UnicodeError) as exc:
            raise CrucibleError(
                FORBIDDEN,
                f"webhook.url: the host {host!r} does not resolve ({type(exc).__name__})",
                {"field": "webhook.url", "host": host},
            ) from None
        if not addresses:
            raise CrucibleError(
                FORBIDDEN,
                f"webhook.url: the host {host!r} does not resolve",
                {"field": "webhook.url", "host": host},
            )
    checked: list[IPAddress] = []
    for address in addresses:
        ip = _normalised(ipaddress.ip_address(address.split("%", 1)[0]))
        if not _is_public(ip) and not _allowed_by_settings(host, ip, allowed_hosts):
            raise CrucibleError(
                FORBIDDEN,
                f"webhook.url: {host!r} resolves to {ip}, a private, loopback, link-local or "
                "reserved address; webhooks go to public addresses only (the operator can "
                "allow hosts with CRUCIBLE_WEBHOOK_ALLOWED_HOSTS)",
                {"field": "webhook.url", "host": host, "address": str(ip)},
            )
        checked.append(ip)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    return WebhookTarget(
        url=url,
        scheme=parts.scheme,
        host=host,
        port=port,
        target=target,
        ip=str(checked[0]),
    )
