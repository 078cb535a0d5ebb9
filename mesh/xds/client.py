"""The discovery client on a plain thread (grpcio's synchronous API).

    client = XdsClient(ClientConfig(target="10.0.0.1:15012", node=NodeInfo(...), root_pem=...), handler)
    client.start()
    client.wait_synced(5)
    client.resources(resources.WORKLOAD)      # the last good configuration, always available
    client.stop()

`handler(update)` runs on the client's thread for every response before it is applied; raising
(`mesh.xds.errors.Rejected` or anything else) refuses it: the client NACKs with the exception's message
and keeps its previous configuration.  While the control plane is away the client keeps that
configuration and reconnects with jittered exponential backoff, resuming with the versions it holds.
The channel pings the control plane when it has heard nothing for `keepalive_time` (gRPC keepalive), so
a silent partition ends the stream after `keepalive_timeout` and the client reconnects.
For trio, use `mesh.xds.trio_client`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2 as xds
from google.protobuf.message import Message

from mesh import defaults
from mesh.xds import resources as rs
from mesh.xds.client_state import Candidate, ClientState, Update
from mesh.xds.node import NodeInfo

log = logging.getLogger(__name__)

Handler = Callable[[Update], None]

_END = object()


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
        self._call: Any = None
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
        call = self._call
        if call is not None:
            call.cancel()
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

    def channel_options(self) -> list[tuple[str, Any]]:
        cfg = self.config
        return [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", int(cfg.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that has nothing to say
            ("grpc.http2.ping_timeout_ms", int(cfg.keepalive_timeout * 1000)),  # newer gRPC times pings with this
        ]

    def _channel(self) -> grpc.Channel:
        cfg = self.config
        options = self.channel_options()
        root_pem = cfg.root_pem_fn() if cfg.root_pem_fn is not None else cfg.root_pem
        if root_pem is None:
            return grpc.insecure_channel(cfg.target, options=options)
        if cfg.server_name:
            options.append(("grpc.ssl_target_name_override", cfg.server_name))
        creds = grpc.ssl_channel_credentials(root_pem, cfg.client_key_pem, cfg.client_chain_pem)
        return grpc.secure_channel(cfg.target, creds, options=options)

    def _session(self) -> bool:
        """One stream, until it breaks; True if the server answered at least once."""
        outbox: queue.Queue[Any] = queue.Queue()
        with self._cond:
            for req in self._state.initial_requests():
                outbox.put(req)

        def requests() -> Iterator[xds.DeltaDiscoveryRequest]:
            while True:
                item = outbox.get()
                if item is _END:
                    return
                yield item

        got_response = False
        channel = self._channel()
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)  # type: ignore[no-untyped-call]
            metadata = self.config.metadata_fn() if self.config.metadata_fn is not None else self.config.metadata
            call = stub.DeltaAggregatedResources(requests(), metadata=metadata or None)
            self._call = call
            if self._stop.is_set():
                call.cancel()
            for resp in call:
                if not got_response:
                    got_response = True
                    self.connects += 1
                    self._set_connected(True)
                outbox.put(self._handle(resp))
            self.last_error = "closed by the control plane"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            self.last_error = f"{code}: {exc.details() if hasattr(exc, 'details') else exc}"
        except Exception as exc:  # never let the thread die: keep the last good configuration
            log.exception("discovery client failed")
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            outbox.put(_END)
            self._call = None
            self._set_connected(False)
            channel.close()
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
