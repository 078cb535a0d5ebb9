"""CONNECT request headers: building them (client) and deciding whether a received one is well formed
(server).  Pure functions over header lists; the protocol core calls them, nothing here does I/O.

An HBONE request is a classic HTTP/2 CONNECT (RFC 9113 section 8.5): `:method` CONNECT and
`:authority` the original destination `IP:port`, no `:scheme` or `:path`.  Regular headers carry the
client's original address (`Forwarded: for="ip:port"`, plus `;host=<service>` when a service was
targeted) and trace context (`baggage`, `traceparent`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.hbone.errors import InvalidAuthorityError

Header = tuple[str, str]

# Connection-specific fields are forbidden in HTTP/2 (RFC 9113 section 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$"
)
# Each header costs its name, its value and 32 bytes of bookkeeping (RFC 9113 section 6.5.2).
HEADER_OVERHEAD = 32


@dataclass(frozen=True)
class Authority:
    host: str  # an IP address (no brackets) or a DNS name
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_authority(value: str) -> Authority:
    """`host:port` with an IPv4 address, a bracketed IPv6 address or a DNS name; else
    `InvalidAuthorityError`."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidAuthorityError(f"authority {value!r}: write an IPv6 target as [address]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidAuthorityError(f"authority {value!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise InvalidAuthorityError(f"authority {value!r} is not host:port (e.g. 10.244.1.5:8080)")
        if ":" in host:
            raise InvalidAuthorityError(f"authority {value!r}: put an IPv6 address in brackets")
        if not _HOSTNAME_RE.match(host):
            raise InvalidAuthorityError(f"authority {value!r}: {host!r} is not an address or host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidAuthorityError(f"authority {value!r}: port must be a number from 1 to 65535")
    return Authority(host, int(port_text))


def forwarded_value(client: str, *, host: str | None = None) -> str:
    """The `Forwarded` header naming the original client `ip:port` (and the service targeted)."""
    value = f'for="{client}"'
    if host:
        value += f";host={host}" if _TOKEN_RE.match(host.lower()) else f'host="{host}"'
    return value


def request_headers(
    *,
    forwarded_for: str | None = None,
    service_host: str | None = None,
    baggage: str | None = None,
    traceparent: str | None = None,
    extra: Iterable[Header] = (),
) -> list[Header]:
    """The regular headers of an HBONE CONNECT (the pseudo-headers are added by `open_stream`)."""
    headers: list[Header] = []
    if forwarded_for:
        headers.append(("forwarded", forwarded_value(forwarded_for, host=service_host)))
    if baggage:
        headers.append(("baggage", baggage))
    if traceparent:
        headers.append(("traceparent", traceparent))
    headers.extend(extra)
    return headers


def header_list_size(headers: Iterable[tuple[str | bytes, str | bytes]]) -> int:
    total = 0
    for name, value in headers:
        total += len(name) + len(value) + HEADER_OVERHEAD
    return total


def check_regular_headers(headers: Sequence[Header]) -> None:
    """Raise `ValueError` for a header an HBONE client must not send."""
    for name, value in headers:
        if name.startswith(":"):
            raise ValueError(f"header {name!r}: pseudo-headers are set by the tunnel itself")
        if not _TOKEN_RE.match(name):
            raise ValueError(f"header name {name!r} must be a lower-case token")
        if name in _CONNECTION_SPECIFIC:
            raise ValueError(f"header {name!r} is connection-specific and not allowed in HTTP/2")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"header {name!r} has a line break or NUL in its value")


@dataclass(frozen=True)
class ConnectRequest:
    """A received, well-formed HBONE CONNECT."""

    authority: Authority
    headers: tuple[Header, ...]  # regular headers, in order, names lower-case

    def header(self, name: str) -> str | None:
        """The first value of `name` (lower-case), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def forwarded_for(self) -> str | None:
        """The original client `ip:port` from `Forwarded: for=...`, if given."""
        return _forwarded_param(self.header("forwarded"), "for")

    @property
    def forwarded_host(self) -> str | None:
        return _forwarded_param(self.header("forwarded"), "host")


def _forwarded_param(value: str | None, key: str) -> str | None:
    if value is None:
        return None
    first = value.split(",", 1)[0]
    for part in first.split(";"):
        name, sep, param = part.strip().partition("=")
        if sep and name.strip().lower() == key:
            param = param.strip()
            if len(param) >= 2 and param[0] == param[-1] == '"':
                param = param[1:-1]
            return param
    return None


@dataclass(frozen=True)
class Malformed:
    """A received request that is not an acceptable CONNECT: answer 400 with `reason`."""

    reason: str


def parse_connect(raw: Sequence[tuple[bytes, bytes]]) -> ConnectRequest | Malformed:
    """Decide whether received request headers are a well-formed classic CONNECT."""
    pseudo: dict[str, str] = {}
    regular: list[Header] = []
    for raw_name, raw_value in raw:
        try:
            name, value = raw_name.decode("ascii"), raw_value.decode("ascii")
        except UnicodeDecodeError:
            return Malformed("header names and values must be ASCII")
        if name.startswith(":"):
            if regular:
                return Malformed(f"pseudo-header {name} after a regular header")
            if name in pseudo:
                return Malformed(f"pseudo-header {name} given twice")
            pseudo[name] = value
            continue
        if not _TOKEN_RE.match(name):
            return Malformed(f"header name {name!r} is not a lower-case token")
        if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
            return Malformed(f"connection-specific header {name!r} is not allowed in HTTP/2")
        if "\r" in value or "\n" in value or "\0" in value:
            return Malformed(f"header {name!r} has a line break or NUL in its value")
        regular.append((name, value))
    method = pseudo.pop(":method", None)
    if method is None:
        return Malformed("request has no :method")
    if method != "CONNECT":
        return Malformed(f"method {method} is not CONNECT: this port only carries HBONE tunnels")
    if ":protocol" in pseudo:
        return Malformed("extended CONNECT (:protocol) is not supported: send a classic CONNECT")
    for forbidden in (":scheme", ":path"):
        if forbidden in pseudo:
            return Malformed(f"a classic CONNECT has no {forbidden}")
    authority = pseudo.pop(":authority", None)
    if authority is None:
        return Malformed("CONNECT has no :authority: it must name the destination ip:port")
    if pseudo:
        return Malformed(f"unknown pseudo-header {sorted(pseudo)[0]}")
    try:
        target = parse_authority(authority)
    except InvalidAuthorityError as exc:
        return Malformed(str(exc))
    return ConnectRequest(target, tuple(regular))
