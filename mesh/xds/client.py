"""The discovery client on a plain thread (gRPC over `mesh.grpcwire`, not grpcio).

    client = XdsClient(ClientConfig(target="10.0.0.1:15012", node=NodeInfo(...), root_pem=...), handler)
    client.start()
    client.wait_synced(5)
    client.resources(resources.WORKLOAD)      # the last good configuration, always available
    client.stop()

`handler(update)` runs on the client's thread for every response before it is applied; raising
(`mesh.xds.errors.Rejected` or anything else) refuses it: the client NACKs with the exception's message
and keeps its previous configuration.  While the control plane is away the client keeps that
configuration and reconnects with jittered exponential backoff, resuming with the versions it holds.
The stream pings the control plane when it has heard nothing for `keepalive_time` (gRPC keepalive), so
a silent partition ends the stream after `keepalive_timeout` and the client reconnects; the server's
GOAWAY ends it too.
For trio, use `mesh.xds.trio_client`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf.message import DecodeError, Message

from mesh import defaults, grpcwire
from mesh.xds import resources as rs
from mesh.xds.client_state import Candidate, ClientState, Update
from mesh.xds.node import NodeInfo

log = logging.getLogger(__name__)

Handler = Callable[[Update], None]

METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
MAX_MESSAGE = 64 * 1024 * 1024  # the largest response accepted (a big mesh's first answer)


@dataclass(frozen=True)
class ClientConfig:
    target: str  # "host:port" of the control plane (15012)
    node: NodeInfo
    # type_url -> names (None: wildcard, i.e. whatever this node needs)
    subscriptions: Mapping[str, Sequence[str] | None] = field(
        default_factory=lambda: {t: None for t in rs.ALL_TYPES}
    )
    root_pem: bytes | None = None  # trust anchor; None means plaintext (tests and debugging only)
    # Read again for each new stream instead of `root_pem` when set: the trust bundle of a file that is
    # replaced when the root is rotated (`mesh.secrets.bundle.TrustBundle.pem`).
    root_pem_fn: Callable[[], bytes] | None = None
    server_name: str | None = None  # TLS name to check when it differs from the target's host
    client_key_pem: bytes | None = None
    client_chain_pem: bytes | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # e.g. (("authorization", "Bearer ..."),)
    # Read again for each new stream, e.g. the token from a file the kubelet or the controller replaces
    # (a projected token expires); when set, it is sent instead of `metadata`.
    metadata_fn: Callable[[], tuple[tuple[str, str], ...]] | None = None
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    keepalive_time: float = defaults.XDS_KEEPALIVE_TIME  # seconds without a read before a ping
    keepalive_timeout: float = defaults.XDS_KEEPALIVE_TIMEOUT  # seconds to wait for the ping's answer


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: a random delay in [cap/2, cap], cap = initial * 2**attempt."""
    cap = min(maximum, initial * (2 ** min(attempt, 30)))
    return (rng or random).uniform(cap / 2, cap)


class XdsClient:
    def __init__(self, config: ClientConfig, handler: Handler | None = None) -> None:
        self.config = config
        self._handler = handler
        self._state = ClientState(node=config.node, subscriptions=dict(config.subscriptions))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._canceller: grpcwire.Canceller | None = None  # the current stream's, also while it connects
        self._thread: threading.Thread | None = None
        self.connected = False
        self.connects = 0
        self.last_error = ""

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"xds-{self.config.node.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        canceller = self._canceller
        if canceller is not None:
            canceller.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> XdsClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading the configuration -----------------------------------------------------------------

    def resources(self, type_url: str) -> dict[str, Message]:
        with self._cond:
            return self._state.resources(type_url)

    def acked_version(self, type_url: str) -> str:
        with self._cond:
            return self._state.acked_version.get(type_url, "")

    @property
    def nacks(self) -> int:
        return self._state.nacks

    def wait_for(self, predicate: Callable[[XdsClient], bool], timeout: float) -> bool:
        """Wait until `predicate(self)` holds (checked after every response and connection change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_synced(self, timeout: float) -> bool:
        """Wait until every subscribed type has had a response on the current connection."""
        return self.wait_for(
            lambda c: c.connected and set(c._state.subscriptions) <= c._state.synced, timeout
        )

    # -- the connection loop -----------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            got_response = self._session()
            if self._stop.is_set():
                break
            attempt = 0 if got_response else attempt + 1
            delay = backoff_delay(attempt, self.config.backoff_initial, self.config.backoff_max)
            log.info("discovery stream to %s ended (%s); retrying in %.2fs", self.config.target, self.last_error, delay)
            self._stop.wait(delay)

    def stream_options(self) -> dict[str, float | int]:
        """How the stream is kept: the largest message, and the keepalive (ping after `keepalive_time`
        without a read, give up when the ping's answer has not come within `keepalive_timeout`)."""
        cfg = self.config
        return {"max_message": MAX_MESSAGE, "keepalive_time": cfg.keepalive_time,
                "keepalive_timeout": cfg.keepalive_timeout}

    def _security(self) -> grpcwire.Security:
        cfg = self.config
        root_pem = cfg.root_pem_fn() if cfg.root_pem_fn is not None else cfg.root_pem
        if root_pem is None:
            return grpcwire.Security()
        return grpcwire.Security(root_pem=root_pem, server_name=cfg.server_name,
                                 client_key_pem=cfg.client_key_pem, client_chain_pem=cfg.client_chain_pem)

    def _session(self) -> bool:
        """One stream, until it breaks; True if the server answered at least once."""
        got_response = False
        stream: grpcwire.Stream | None = None
        canceller = self._canceller = grpcwire.Canceller()
        if self._stop.is_set():  # stop() ran before the canceller was there
            canceller.cancel()
        try:
            metadata = self.config.metadata_fn() if self.config.metadata_fn is not None else self.config.metadata
            stream = grpcwire.Stream.open(
                self.config.target, METHOD, self._security(), metadata=metadata, max_message=MAX_MESSAGE,
                keepalive_time=self.config.keepalive_time, keepalive_timeout=self.config.keepalive_timeout,
                canceller=canceller,
            )
            with self._cond:
                initial = self._state.initial_requests()
            for req in initial:
                stream.send(req.SerializeToString())
            while (data := stream.recv()) is not None:
                try:
                    resp = xds.DeltaDiscoveryResponse.FromString(data)
                except DecodeError as exc:
                    raise grpcwire.GrpcError("INTERNAL", f"a response that is not a DeltaDiscoveryResponse: {exc}") from None
                if not got_response:
                    got_response = True
                    self.connects += 1
                    self._set_connected(True)
                stream.send(self._handle(resp).SerializeToString())
            self.last_error = "closed by the control plane"
        except grpcwire.GrpcError as exc:
            self.last_error = f"{exc.code}: {exc.details}"
        except Exception as exc:  # never let the thread die: keep the last good configuration
            log.exception("discovery client failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._canceller = None
            self._set_connected(False)
            if stream is not None:
                stream.close()
        return got_response

    def _handle(self, resp: xds.DeltaDiscoveryResponse) -> xds.DeltaDiscoveryRequest:
        cand: Candidate = self._state.on_response(resp)
        reason = cand.error
        if not reason and self._handler is not None:
            try:
                self._handler(cand.update)
            except Exception as exc:  # the handler refused it
                reason = str(exc) or type(exc).__name__
        with self._cond:
            if reason:
                log.warning("rejected %s version %s: %s", resp.type_url, resp.system_version_info, reason)
                req = self._state.reject(cand, reason)
            else:
                req = self._state.commit(cand)
            self._cond.notify_all()
        return req

    def _set_connected(self, value: bool) -> None:
        with self._cond:
            self.connected = value
            self._cond.notify_all()
