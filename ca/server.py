"""The CA's gRPC server, assembled in one place, top to bottom: state directory → CA → token issuer →
service → TLS → gRPC server.

    server = CAServer.from_state_dir(home, pods, trust_domain=td, serving_hosts=[...])
    add_to_server(server.grpc, discovery)     # the control plane hosts discovery on the same port
    port = await server.start("0.0.0.0:15012")
    ...
    await server.stop(1.0)

The control plane runs it so (`controlplane.app`); tests, benchmarks and `python -m ca.server` run the
same server alone, on an event loop of its own (`start_ca_server`).

A state directory (the control plane's `DIR/controlplane/`) holds:

    ca/                  the CA's root and signing key, in Istio's `cacerts` layout (`ca.authority`), and a
                         root rotation under way (`ca.rotation`: rotation.json, next/)
    node-token-key.pem   the key tokens are signed with (`ca.auth.NodeTokenIssuer`); read here and nowhere
                         else: whoever needs a token asks the control plane for one (its apply API, `/token`)
    node-token-key.retiring.json   the token keys it replaced, accepted until their overlap ends

The server also answers the operator's CA requests (the apply API's `/ca/...`, `meshctl ca`): the token
key's status and rotation, the root's status and rotation; `tick()` (the owner calls it every second or
so) moves a root rotation through its phases and rotates the token key on its schedule.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from ca.auth import DEFAULT_TOKEN_TTL, Authenticator, NodeTokenIssuer
from ca.authority import ROOT_CERT, CertificateAuthority
from ca.errors import CAError
from ca.metrics import CAMetrics
from ca.pods import InMemoryPodLocator, PodLocator, PodPlacement
from ca.rotation import RootRotator
from ca.service import AsyncCertificateServicer, CertificateService, add_to_server
from ca.serving import RotatingServingCertificate, server_credentials
from mesh import defaults
from mesh.loopthread import LoopThread

# Requests above this are cut off by gRPC before any servicer sees them (certificate requests are also
# refused above `ca.service.MAX_REQUEST_BYTES` by the service, counted); discovery responses may be large.
MAX_TRANSPORT_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", MAX_TRANSPORT_BYTES),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Keepalive (mesh.defaults): a client that went silent is dropped, and clients' pings are welcome.
    ("grpc.keepalive_time_ms", int(defaults.XDS_SERVER_KEEPALIVE_TIME * 1000)),
    ("grpc.keepalive_timeout_ms", int(defaults.XDS_KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.http2.ping_timeout_ms", int(defaults.XDS_KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", int(defaults.XDS_SERVER_MIN_PING_INTERVAL * 1000)),
    ("grpc.http2.max_pings_without_data", 0),
)
DEFAULT_SERVING_HOSTS = ("localhost", "127.0.0.1")


class CAServerError(CAError):
    """The CA's server cannot listen."""


def load_state(home: Path, trust_domain: str = defaults.TRUST_DOMAIN, *,
               token_ttl: datetime.timedelta = DEFAULT_TOKEN_TTL) -> tuple[CertificateAuthority, NodeTokenIssuer]:
    """The CA (`home/ca/`, a root rotation a crash interrupted finished first) and the token issuer
    (`home/node-token-key.pem`, tokens living `token_ttl` at most), each made on first start."""
    RootRotator.recover(home / defaults.CA_DIR)
    authority = CertificateAuthority.load_or_create(home / defaults.CA_DIR, trust_domain=trust_domain)
    issuer = NodeTokenIssuer.load_or_create(home / defaults.TOKEN_KEY_FILE, ttl=token_ttl)
    return authority, issuer


class CAServer:
    """A `grpc.aio` server hosting the CA service; its owner may add services before `start`.
    Make it on the event loop that will run it."""

    def __init__(
        self,
        authority: CertificateAuthority,
        authenticator: Authenticator,
        pods: PodLocator,
        *,
        issuer: NodeTokenIssuer | None = None,
        rotator: RootRotator | None = None,
        registry: CollectorRegistry | None = None,
        serving_hosts: Sequence[str] = DEFAULT_SERVING_HOSTS,
        plaintext: bool = False,
        token_key_rotation: datetime.timedelta | None = None,
    ) -> None:
        """`rotator`: root rotations (without one, `rotate_root` is refused); `token_key_rotation`: rotate
        the token key when it is that old (None: only when asked)."""
        self.authority = authority
        self.issuer = issuer
        self.rotator = rotator
        self.token_key_rotation = token_key_rotation
        self.registry = registry if registry is not None else CollectorRegistry()
        self.service = CertificateService(authority, authenticator, pods, CAMetrics(self.registry))
        self.grpc = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(self.grpc, AsyncCertificateServicer(self.service))
        self._credentials: grpc.ServerCredentials | None = None
        self.serving: RotatingServingCertificate | None = None
        if not plaintext:  # plaintext: debugging only
            self._credentials, self.serving = server_credentials(authority, list(serving_hosts))
        self.port = 0

    @classmethod
    def from_state_dir(cls, home: Path, pods: PodLocator, *, trust_domain: str = defaults.TRUST_DOMAIN,
                       authenticator: Authenticator | None = None,
                       token_ttl: datetime.timedelta = DEFAULT_TOKEN_TTL, **kwargs: Any) -> CAServer:
        """The CA of `home`; callers are authenticated by `authenticator` (on Kubernetes, TokenReview),
        else by the tokens of `home`'s token issuer (the local cluster)."""
        authority, issuer = load_state(home, trust_domain, token_ttl=token_ttl)
        rotator = RootRotator(authority, home / defaults.CA_DIR)
        return cls(authority, authenticator or issuer.authenticator(), pods, issuer=issuer, rotator=rotator,
                   **kwargs)

    @property
    def root_pem(self) -> bytes | None:
        """The trust anchor clients need (None when serving plaintext)."""
        return self.serving.current.root_pem if self.serving is not None else None

    async def start(self, listen: str) -> int:
        """Bind `listen` (`HOST:PORT`; port 0 picks one) and serve; the bound port."""
        if self._credentials is not None:
            port = self.grpc.add_secure_port(listen, self._credentials)
        else:
            port = self.grpc.add_insecure_port(listen)
        if port == 0:
            raise CAServerError(f"cannot listen on {listen}: is another control plane running?")
        await self.grpc.start()
        self.port = port
        return port

    async def stop(self, grace: float | None) -> None:
        await self.grpc.stop(grace)

    # ---- the operator's requests (thread-safe: the apply API calls them from its threads) ---------------

    def _issuer(self) -> NodeTokenIssuer:
        if self.issuer is None:
            raise CAServerError("this CA mints no tokens: it has no token key")
        return self.issuer

    def token_key_status(self) -> dict[str, Any]:
        return self._issuer().ring.status()

    def rotate_token_key(self, overlap: datetime.timedelta) -> dict[str, Any]:
        """A new token signing key; the current one is accepted for `overlap` more (0: revoked now)."""
        return self._issuer().rotate_key(overlap)

    def root_status(self) -> dict[str, Any]:
        if self.rotator is None:
            raise CAServerError("this CA was not started from a state directory: it cannot rotate its root")
        return self.rotator.status()

    def rotate_root(self, propagation: datetime.timedelta, overlap: datetime.timedelta) -> dict[str, Any]:
        """Start a root rotation (`ca.rotation`); raises `RotationError` if it cannot start."""
        if self.rotator is None:
            raise CAServerError("this CA was not started from a state directory: it cannot rotate its root")
        return self.rotator.start(propagation, overlap)

    def tick(self, now: datetime.datetime | None = None) -> None:
        """Move a root rotation on, and rotate the token key when it is due (see the constructor)."""
        now = now or datetime.datetime.now(datetime.UTC)
        if self.rotator is not None:
            self.rotator.advance(now)
        every = self.token_key_rotation
        if every and self.issuer is not None and now - self.issuer.ring.since >= every:
            # Tokens signed by the old key stay good until they expire: the overlap is their lifetime.
            self.issuer.rotate_key(self.issuer.ttl)


@dataclass
class RunningCA:
    """A CA server listening on `address`, on its own event loop; `stop()` it when done."""

    server: CAServer
    address: str
    port: int
    loop: LoopThread

    @property
    def service(self) -> CertificateService:
        return self.server.service

    @property
    def registry(self) -> CollectorRegistry:
        return self.server.registry

    @property
    def root_pem(self) -> str:
        return self.server.authority.root_pem

    def stop(self, grace: float | None = None) -> None:
        if self.loop.closed:  # stopped already
            return
        try:
            self.loop.run(self.server.stop(grace))
        finally:
            self.loop.close()


def start_ca_server(
    authority: CertificateAuthority,
    authenticator: Authenticator,
    pods: PodLocator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    serving_hosts: Sequence[str] | None = None,
    issuer: NodeTokenIssuer | None = None,
) -> RunningCA:
    """The CA server alone, on an event loop of its own.  `port=0` picks a free port."""
    loop = LoopThread("ca")

    async def start() -> CAServer:
        server = CAServer(authority, authenticator, pods, issuer=issuer, registry=registry,
                          serving_hosts=list(serving_hosts or [host, "localhost"]))
        await server.start(f"{host}:{port}")
        return server

    try:
        server = loop.run(start())
    except BaseException:
        loop.close()
        raise
    return RunningCA(server, f"{host}:{server.port}", server.port, loop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ca.server",
        description="Run a standalone mesh CA on TLS gRPC, printing node tokens for the nodes named.",
    )
    parser.add_argument("--state-dir", type=Path, required=True, help="where the CA keeps its root and token key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=defaults.CONTROLPLANE_GRPC_PORT)
    parser.add_argument("--trust-domain", default=defaults.TRUST_DOMAIN)
    parser.add_argument("--node", action="append", default=[], help="mint a node token for NODE (repeatable)")
    parser.add_argument(
        "--pod",
        action="append",
        default=[],
        metavar="NODE/NS/SA",
        help="treat a pod with service account SA in namespace NS as scheduled on NODE (repeatable)",
    )
    args = parser.parse_args(argv)

    authority, issuer = load_state(args.state_dir, args.trust_domain)
    pods = InMemoryPodLocator()
    for i, spec in enumerate(args.pod):
        node, ns, sa = spec.split("/", 2)
        pods.put(PodPlacement(ns, f"pod-{i}", sa, node))
    running = start_ca_server(authority, issuer.authenticator(), pods, host=args.host, port=args.port, issuer=issuer)
    print(f"CA listening on {running.address} (root: {args.state_dir / defaults.CA_DIR / ROOT_CERT})", flush=True)
    for node in args.node:
        token = issuer.mint_node_token(node, ttl=datetime.timedelta(days=1))
        print(f"node token for {node}: {token}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        running.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
