"""What a source condition of an AuthorizationPolicy means: the one matcher for principals, namespaces,
strings and IP blocks, shared by the node agent, the waypoint's L4 passthrough and its L7 authorization.

Patterns come in two spellings that mean the same: Istio's text (`*` any non-empty value, `prefix*`,
`*suffix`, or an exact value), as users write them and the waypoint reads them, and the `StringMatch`
message the control plane sends to node agents (`string_match()` turns the first into the second).
Every matcher here takes either.

Principals follow Istio: `spiffe://td/ns/NS/sa/SA` and `td/ns/NS/sa/SA` are the same principal, written
in a pattern or given as the peer's identity.  `principal_match()` drops the scheme from a pattern (the
form the control plane sends); a `StringMatch` that still carries it is compared with the peer's full URI.
A missing identity (None or "") fails every positive condition and passes every negative one.

IP blocks are CIDRs (a bare address is that one address, host bits are ignored); a v4-mapped IPv6 source
(`::ffff:10.0.0.1`) is its IPv4 address.  A block that does not parse matches nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from mesh.identity import SCHEME, SpiffeId
from mesh.proto import discovery_pb2 as pb

Pattern = pb.StringMatch | str
Principal = SpiffeId | str | None

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- patterns --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> tuple[str, str]:
    """Istio's spelling of a string condition as (kind, text): the one reading of `*`."""
    if value == "*":
        return "presence", ""
    if value.endswith("*"):
        return "prefix", value[:-1]
    if value.startswith("*"):
        return "suffix", value[1:]
    return "exact", value


def string_match(value: str) -> pb.StringMatch:
    """`*`, `prefix*`, `*suffix` or an exact value, as a `StringMatch`."""
    kind, text = _parse(value)
    if kind == "presence":
        return pb.StringMatch(presence=True)
    if kind == "prefix":
        return pb.StringMatch(prefix=text)
    if kind == "suffix":
        return pb.StringMatch(suffix=text)
    return pb.StringMatch(exact=text)


def principal_match(value: str) -> pb.StringMatch:
    """A principal pattern as a `StringMatch`, in Istio's form (a `spiffe://` the user wrote is dropped)."""
    return string_match(value.removeprefix(SCHEME))


def _kind_text(pattern: Pattern, principal: bool = False) -> tuple[str | None, str]:
    if isinstance(pattern, str):
        return _parse(pattern.removeprefix(SCHEME) if principal else pattern)
    kind = pattern.WhichOneof("match")
    if kind == "presence":
        return (kind if pattern.presence else None), ""
    return kind, (getattr(pattern, kind) if kind else "")


def _holds(kind: str | None, text: str, value: str) -> bool:
    if kind == "presence":
        return value != ""
    if kind == "exact":
        return value == text
    if kind == "prefix":
        return value.startswith(text)
    if kind == "suffix":
        return value.endswith(text)
    return False  # an empty StringMatch matches nothing


# --- matchers --------------------------------------------------------------------------------------------


def string_matches(pattern: Pattern, value: str | None) -> bool:
    """Does `pattern` match `value`?  None (the value is unknown) matches nothing."""
    if value is None:
        return False
    return _holds(*_kind_text(pattern), value)


def any_string(patterns: Iterable[Pattern], value: str | None) -> bool:
    return any(string_matches(p, value) for p in patterns)


def namespace_matches(pattern: Pattern, namespace: str | None) -> bool:
    """The namespace of the peer's identity; None or "" (no identity) matches nothing."""
    return string_matches(pattern, namespace or None)


def any_namespace(patterns: Iterable[Pattern], namespace: str | None) -> bool:
    return any(namespace_matches(p, namespace) for p in patterns)


def principal_forms(principal: Principal) -> tuple[str, str] | None:
    """(`td/ns/NS/sa/SA`, `spiffe://td/ns/NS/sa/SA`) for an identity in either spelling; None without one."""
    if principal is None or principal == "":
        return None
    uri = principal.uri if isinstance(principal, SpiffeId) else principal
    short = uri.removeprefix(SCHEME)
    return short, SCHEME + short


def _principal_holds(pattern: Pattern, forms: tuple[str, str] | None) -> bool:
    if forms is None:
        return False
    kind, text = _kind_text(pattern, principal=True)
    short, full = forms
    return _holds(kind, text, full if text.startswith(SCHEME) else short)


def principal_matches(pattern: Pattern, principal: Principal) -> bool:
    """Does `pattern` match the peer's identity (either spelling on either side)?"""
    return _principal_holds(pattern, principal_forms(principal))


def any_principal(patterns: Iterable[Pattern], principal: Principal) -> bool:
    forms = principal_forms(principal)
    return any(_principal_holds(p, forms) for p in patterns)


# --- IP blocks -------------------------------------------------------------------------------------------


def cidr(value: str) -> str:
    """The canonical form of an IP block (`10.0.0.7/8` -> `10.0.0.0/8`, `10.0.0.7` -> `10.0.0.7/32`);
    ValueError when it is not one."""
    return str(ipaddress.ip_network(value, strict=False))


@functools.lru_cache(maxsize=4096)
def _network(block: str) -> _Network | None:
    try:
        return ipaddress.ip_network(block.strip(), strict=False)
    except ValueError:
        return None  # the control plane validates CIDRs; a bad one matches nothing rather than crash


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> _Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_in(blocks: Iterable[str], ip: str | None) -> bool:
    """Is `ip` inside any of `blocks`?  An address that does not parse (or None) is in none."""
    addr = _address(ip) if ip else None
    if addr is None:
        return False
    for block in blocks:
        net = _network(block)
        if net is not None and addr.version == net.version and addr in net:
            return True
    return False
