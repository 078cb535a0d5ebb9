"""Plain values shared by every step of the request pipeline: endpoints, who the client is, request and
response heads, and header lists.

Headers are tuples of `(name, value)` with lower-case names, decoded as Latin-1 so that any byte survives
a round trip between HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

Headers = tuple[tuple[str, str], ...]

# Connection-specific headers never forwarded (RFC 9110 section 7.6.1 and RFC 9113 section 8.2.2).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te",
                        "http2-settings", "host"})


def header(headers: Headers, name: str) -> str | None:
    """The first value of `name` (lower case), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None


def header_values(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k == name]


def without(headers: Headers, names: Iterable[str]) -> Headers:
    """`headers` minus every `names` (a frozenset of lower-case names is used as it is: build it once)."""
    drop = names if isinstance(names, frozenset) else {n.lower() for n in names}
    return tuple([(k, v) for k, v in headers if k not in drop])


def with_header(headers: Headers, name: str, value: str) -> Headers:
    """`headers` with `name` set to exactly `value` (replacing any earlier values)."""
    return (*without(headers, [name]), (name.lower(), value))


def forwardable(headers: Headers) -> Headers:
    """`headers` minus the hop-by-hop ones (and those the `Connection` header names)."""
    named = {t.strip().lower() for v in header_values(headers, "connection") for t in v.split(",")}
    if not named:  # (the common case: one set to check)
        return tuple([h for h in headers if h[0] not in HOP_BY_HOP])
    return tuple([(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named])


@dataclass(frozen=True)
class Endpoint:
    """One workload address a request can be sent to."""

    address: str
    port: int
    uid: str = ""
    name: str = ""
    namespace: str = ""
    identity: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    app: str = ""
    version: str = ""
    healthy: bool = True
    hbone: bool = False  # in the mesh: reached over HBONE (its node agent's 15008), else plain TCP
    canonical_service: str = ""  # for the metrics' *_canonical_service and *_canonical_revision
    canonical_revision: str = ""
    cluster: str = ""  # the workload's cluster id

    @cached_property
    def key(self) -> str:
        return f"{self.address}:{self.port}"

    def __hash__(self) -> int:
        """The dataclass's hash (of every field), computed once: endpoints key per-request caches."""
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash(tuple(getattr(self, f.name) for f in fields(self)))
        return h

    def has_labels(self, wanted: tuple[tuple[str, str], ...]) -> bool:
        mine = dict(self.labels)
        return all(mine.get(k) == v for k, v in wanted)


@dataclass(frozen=True)
class ClientInfo:
    """Who sent an inbound tunnel: what the HBONE layer knows before any HTTP is read.

    `peer_identity` is the SPIFFE URI of the client certificate (or "" when unknown), `source` the client's
    `ip:port` as the connection shows it (never what the client wrote in a header), `original_destination`
    the tunnel's `:authority` (service VIP:port or workload IP:port), `peer_certificate_hash` the SHA-256
    of the client's leaf certificate (DER, hex; "" when unknown), `scheme` what the client's requests
    arrived over when the proxy knows it ("https" on an ingress gateway's HTTPS listener, which terminated
    TLS, "http" on its HTTP listener; "" for a tunnel: the request's own).
    """

    peer_identity: str = ""
    source: str = ""
    original_destination: str = ""
    peer_certificate_hash: str = ""
    scheme: str = ""

    # Derived once per tunnel (every request of the tunnel reads them several times; the fields never change).
    @cached_property
    def source_ip(self) -> str:
        return _split_host_port(self.source)[0]

    @cached_property
    def forwarded_for(self) -> str:
        """The client as a pooled upstream connection's `Forwarded: for=` names it: its address without the
        port (IPv6 in brackets), since the connection serves every connection of that client."""
        ip = self.source_ip
        return f"[{ip}]" if ":" in ip else ip

    @cached_property
    def _destination(self) -> tuple[str, int]:
        return _split_host_port(self.original_destination)

    @property
    def destination_ip(self) -> str:
        return self._destination[0]

    @property
    def destination_port(self) -> int:
        return self._destination[1]

    @cached_property
    def principal(self) -> str:
        """The identity as authorization policies write it: `td/ns/NS/sa/SA` (no scheme)."""
        return self.peer_identity.removeprefix("spiffe://")

    @cached_property
    def namespace(self) -> str:
        parts = self.principal.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""


def _split_host_port(text: str) -> tuple[str, int]:
    if not text:
        return "", 0
    host, _, port = text.rpartition(":")
    if not host:
        return text, 0
    host = host.strip("[]")
    return host, int(port) if port.isdigit() else 0


def split_host_port(text: str) -> tuple[str, int]:
    """`10.0.0.1:80` -> ("10.0.0.1", 80); `[::1]:80` -> ("::1", 80); no port -> (text, 0)."""
    return _split_host_port(text)


@dataclass(frozen=True)
class RequestHead:
    """An HTTP request without its body, the same for HTTP/1.1 and HTTP/2 (no pseudo-headers or Host in
    `headers`: the authority is its own field)."""

    method: str
    path: str
    authority: str
    headers: Headers = ()
    scheme: str = "http"
    protocol: str = "HTTP/1.1"

    @cached_property
    def uri_path(self) -> str:
        return self.path.split("?", 1)[0]

    @cached_property
    def query(self) -> str:
        return self.path.split("?", 1)[1] if "?" in self.path else ""

    @cached_property
    def header(self) -> Callable[[str], str | None]:
        """`header(name)`: the first value of the lower-case header `name`, or None.  A request's head is
        looked up many times along the pipeline (tracing, framing, gRPC, routing, the access log): the
        first use builds an index of first values, and what it returns is the index's own `get`, so
        every lookup is one call in C."""
        index: dict[str, str] = {}
        for k, v in self.headers:
            if k not in index:
                index[k] = v
        return index.get

    @cached_property
    def grpc(self) -> bool:
        """Whether the request is gRPC: its content-type is `application/grpc`, or `application/grpc+`
        and a message format.  Read once: routing, timeouts, retries and the report all ask."""
        ctype = (self.header("content-type") or "").strip().lower()
        return ctype == "application/grpc" or ctype.startswith("application/grpc+")

    def replace(self, **changes: object) -> RequestHead:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: Headers = field(default=())

    def header(self, name: str) -> str | None:
        return header(self.headers, name)
