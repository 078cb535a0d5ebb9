"""The waypoint's way to its endpoints: HBONE to an endpoint in the mesh, plain TCP to one outside it.

`HboneUpstream` is the `waypoint.upstream.pool.Upstream` of a running waypoint.  For an endpoint in the mesh it
opens a tunnel over the shared HBONE pool: TLS to the endpoint pod's 15008 (its node agent) with the
waypoint's own certificate, the server required to present the endpoint workload's identity,
`:authority` = `podIP:targetPort`, and `Forwarded: for="<original client>"` (plus `;host=<service>`)
so the destination's policy and logs see who really called, and the opening request's `traceparent`.  An endpoint outside the mesh (tunnel
protocol NONE) gets a plain TCP connection.  Every failure is a `ConnectFailure` that says what to check.
"""

from __future__ import annotations

import functools

import trio

from mesh import defaults
from mesh.hbone.config import HBONE_PORT
from mesh.hbone.errors import HboneError, TunnelRejected
from mesh.hbone.headers import request_headers
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.identity import IdentityError, SpiffeId
from waypoint.errors import ConnectFailure
from waypoint.l7.model import Endpoint


@functools.lru_cache(maxsize=4096)
def _identity(text: str) -> SpiffeId:
    return SpiffeId.parse(text)  # (once per identity: every new upstream tunnel needs it)


def endpoint_identity(endpoint: Endpoint, trust_domain: str) -> SpiffeId:
    """The identity the endpoint's HBONE server must present (its service account's)."""
    if endpoint.identity:
        try:
            return _identity(endpoint.identity)
        except IdentityError as exc:
            raise ConnectFailure(f"endpoint {endpoint.key} has an invalid identity: {exc}") from None
    return SpiffeId(trust_domain, endpoint.namespace or "default", "default")


class HboneUpstream:
    def __init__(self, pool: HbonePool, identity: SpiffeId, *, trust_domain: str = defaults.TRUST_DOMAIN,
                 connect_timeout: float = 5.0, hbone_port: int = HBONE_PORT) -> None:
        self.pool = pool
        self.identity = identity
        self.trust_domain = trust_domain
        self.connect_timeout = connect_timeout
        self.hbone_port = hbone_port

    async def connect(self, endpoint: Endpoint, *, service: str = "", client: str = "",
                      traceparent: str = "") -> trio.abc.HalfCloseableStream:
        if endpoint.hbone:
            return await self._tunnel(endpoint, service, client, traceparent)
        return await self._plain(endpoint)

    async def _tunnel(self, endpoint: Endpoint, service: str, client: str,
                      traceparent: str) -> trio.abc.HalfCloseableStream:
        key = PoolKey(source=self.identity, destination=endpoint_identity(endpoint, self.trust_domain),
                      address=(endpoint.address, self.hbone_port))
        headers = request_headers(forwarded_for=client or None, service_host=service or None,
                                  traceparent=traceparent or None)
        try:
            return await self.pool.open_tunnel(key, endpoint.key, headers)
        except TunnelRejected as exc:
            raise ConnectFailure(f"{endpoint.key} ({endpoint.name or 'endpoint'}) refused the tunnel with "
                                 f"{exc.status}: {exc.reason or 'no reason given'}") from None
        except HboneError as exc:
            raise ConnectFailure(f"HBONE to {endpoint.key}: {exc}") from None

    async def _plain(self, endpoint: Endpoint) -> trio.abc.HalfCloseableStream:
        try:
            with trio.fail_after(self.connect_timeout):
                return await trio.open_tcp_stream(endpoint.address, endpoint.port)
        except trio.TooSlowError:
            raise ConnectFailure(f"connection to {endpoint.key} timed out after {self.connect_timeout:g}s: "
                                 "is the endpoint running?") from None
        except OSError as exc:
            raise ConnectFailure(f"cannot connect to {endpoint.key}: {exc.strerror or exc}") from None
