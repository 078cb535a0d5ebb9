"""`SecretManager`: certificates per identity for a trio data plane process.

For each identity it is asked about, it makes a key, has the CA sign it (the blocking gRPC call runs in
a worker thread), checks the answer, builds a server and a client `SSLContext`, and keeps renewing at
half-life (`mesh.secrets.renewal` decides when; this module only sleeps and calls).  Callers fetch the
context per connection, so new connections use the renewed certificate while live ones carry on.

The roots it trusts come from a `TrustBundle` (`mesh.secrets.bundle`), looked at every `bundle_poll`
seconds: when they change (a root rotation), every identity's contexts are rebuilt with the new roots at
once, and a certificate that does not chain to the bundle's first root (the CA's signing root) is renewed
within `policy.bundle_renew_jitter` seconds, so that it is from the new root before the old one is dropped.

It does not hold on to what nobody wants: a node agent (`impersonate`) forgets an identity nobody has
asked about (`get`, a context, `current`) for `forget_after` seconds (a pod that left the node; one that
is still there gets a new certificate on its next connection), and at most `max_identities` are held
(the least recently used goes first).

    async with trio.open_nursery() as nursery:
        manager = SecretManager(CAClient(addr, root_pem, token), root_pem, impersonate=True)
        await nursery.start(manager.run)
        await manager.get(identity)                 # first certificate (raises if the CA refuses)
        ctx = manager.server_context(identity)      # per new connection
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from mesh.identity import SpiffeId
from mesh.secrets.bundle import TrustBundle
from mesh.secrets.client import CertificateSigner
from mesh.secrets.errors import NoCertificateError, SecretsError
from mesh.secrets.renewal import RenewalPolicy, RenewalSchedule
from mesh.secrets.svid import Svid, accept_issued, generate_key, make_csr
from mesh.secrets.tls import ALPN_H2, client_context, server_context

log = logging.getLogger(__name__)

DEFAULT_FORGET_AFTER = 3600.0  # seconds an identity may go unused before a node agent forgets it
DEFAULT_MAX_IDENTITIES = 1024
DEFAULT_BUNDLE_POLL = 2.0  # seconds between two looks at the trust bundle's file


@dataclass(frozen=True)
class CertificateStatus:
    identity: str
    state: str
    not_after: str | None
    next_attempt_in: float
    failures: int
    last_error: str | None
    root: str | None = None  # SHA-256 fingerprint (hex) of the root its chain ends in (root rotations)
    serial: str | None = None  # the leaf's serial number (hex)
    not_before: str | None = None
    chain: str | None = None  # PEM, leaf first, then intermediates (no root): `meshctl ca check` reads it


@dataclass
class _Entry:
    identity: SpiffeId
    schedule: RenewalSchedule
    lock: trio.Lock = field(default_factory=trio.Lock)
    svid: Svid | None = None
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None
    generation: int = 0  # how many certificates this identity has had
    last_error: str | None = None
    cancel: trio.CancelScope | None = None
    last_used: float = 0.0  # the manager's clock
    wake: trio.Event = field(default_factory=trio.Event)  # set: look at the schedule again now


class SecretManager:
    def __init__(
        self,
        signer: CertificateSigner,
        trust_bundle: str | bytes | TrustBundle,
        *,
        impersonate: bool = False,
        ttl_seconds: int = 0,
        policy: RenewalPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        alpn: Sequence[str] = (ALPN_H2,),
        forget_after: float = DEFAULT_FORGET_AFTER,
        max_identities: int = DEFAULT_MAX_IDENTITIES,
        bundle_poll: float = DEFAULT_BUNDLE_POLL,
    ) -> None:
        """`impersonate`: ask for each identity via ImpersonatedIdentity (a node agent for its pods);
        otherwise the caller's token must itself be for the identity (a waypoint).
        `trust_bundle`: the roots (PEM, fixed), or a `TrustBundle` (from a file: followed, see above).
        `ttl_seconds`: requested lifetime, 0 for the CA's default.  `forget_after`, `max_identities`: see
        the module docstring (a manager that does not impersonate forgets nothing for being unused)."""
        self._signer = signer
        self._bundle = trust_bundle if isinstance(trust_bundle, TrustBundle) else TrustBundle(trust_bundle)
        self._bundle_version = self._bundle.version
        self._bundle_poll = bundle_poll
        self._impersonate = impersonate
        self._ttl_seconds = ttl_seconds
        self._policy = policy or RenewalPolicy()
        self._rng = rng or random.Random()
        self._clock = clock
        self._alpn = tuple(alpn)
        self._entries: dict[SpiffeId, _Entry] = {}
        self._nursery: trio.Nursery | None = None
        self._forget_after = forget_after
        self._max_identities = max(1, max_identities)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the renewal tasks; runs until cancelled.  Start it with `nursery.start(manager.run)`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._bundle.path is not None:
                nursery.start_soon(self._follow_bundle)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # -- the trust bundle -----------------------------------------------------------------------------

    async def _follow_bundle(self) -> None:
        while True:
            await trio.sleep(self._bundle_poll)
            await trio.to_thread.run_sync(self._bundle.refresh)
            self._bundle_changed()

    def _bundle_changed(self) -> None:
        """If the roots changed since last seen: every context trusts the new roots from the next
        connection, and certificates that do not chain to the first root are renewed soon."""
        if self._bundle.version == self._bundle_version:
            return
        self._bundle_version = self._bundle.version
        roots = self._bundle.certs()
        now = self._clock()
        renewing = 0
        for entry in list(self._entries.values()):
            if entry.svid is None:
                continue
            svid = dataclasses.replace(entry.svid, trust_bundle=roots)
            try:
                self._use(entry, svid)
            except (ssl.SSLError, ValueError) as exc:
                log.warning("cannot rebuild the TLS contexts of %s with the new roots: %s", entry.identity, exc)
                continue
            if svid.root != roots[0]:
                entry.schedule.renew_by(now + self._rng.uniform(0, self._policy.bundle_renew_jitter))
                entry.wake.set()
                renewing += 1
        log.info("trust bundle changed (%d root(s)): contexts rebuilt, %d certificate(s) to renew", len(roots),
                 renewing)

    # -- asking for certificates ------------------------------------------------------------------------

    async def get(self, identity: SpiffeId) -> Svid:
        """The current certificate for `identity`, fetching the first one now (raises `SecretsError`
        if the CA refuses); from then on it is renewed in the background."""
        entry = self._entries.get(identity)
        if entry is None:
            self._make_room()
            entry = _Entry(identity, RenewalSchedule(self._policy, self._rng))
            self._entries[identity] = entry
        self._used(entry)
        async with entry.lock:
            if entry.svid is not None and not entry.schedule.expired(self._clock()):
                return entry.svid
            try:
                svid = await self._issue(entry)
            except SecretsError:
                if entry.svid is None and entry.cancel is None:
                    self._entries.pop(identity, None)
                raise
        self._start_renewal(entry)
        return svid

    def forget(self, identity: SpiffeId) -> None:
        """Stop renewing `identity` and drop its key (the pod left the node)."""
        entry = self._entries.pop(identity, None)
        if entry is not None and entry.cancel is not None:
            entry.cancel.cancel()

    def _used(self, entry: _Entry | None) -> _Entry | None:
        if entry is not None:
            entry.last_used = self._clock()
        return entry

    def _make_room(self) -> None:
        """Forget the least recently used identities until one more fits."""
        while len(self._entries) >= self._max_identities:
            oldest = min(self._entries.values(), key=lambda e: e.last_used)
            log.info("holding %d identities, the most allowed: forgetting %s, the least recently used",
                     len(self._entries), oldest.identity)
            self.forget(oldest.identity)

    # -- what the data plane reads (sync, cheap, per connection) ---------------------------------------

    def current(self, identity: SpiffeId) -> Svid | None:
        entry = self._used(self._entries.get(identity))
        return entry.svid if entry else None

    def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        entry = self._used(self._entries.get(identity))
        if entry is None or entry.server_ctx is None:
            raise NoCertificateError(f"no certificate for {identity} yet: call get() first")
        return entry.server_ctx

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        entry = self._used(self._entries.get(identity))
        if entry is None or entry.client_ctx is None:
            raise NoCertificateError(f"no certificate for {identity} yet: call get() first")
        return entry.client_ctx

    def generation(self, identity: SpiffeId) -> int:
        """How many certificates `identity` has had (grows by one on each renewal)."""
        entry = self._entries.get(identity)
        return entry.generation if entry else 0

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def status(self) -> list[CertificateStatus]:
        """One entry per identity, for the admin endpoint (`dataclasses.asdict()` for JSON)."""
        now = self._clock()
        return [
            CertificateStatus(
                identity=str(e.identity),
                state=e.schedule.state.value,
                not_after=e.svid.leaf.not_valid_after_utc.isoformat() if e.svid else None,
                next_attempt_in=round(e.schedule.delay(now), 1),
                failures=e.schedule.failures,
                last_error=e.last_error,
                root=e.svid.root.sha256_fingerprint.hex() if e.svid and e.svid.root else None,
                serial=format(e.svid.leaf.serial_number, "x") if e.svid else None,
                not_before=e.svid.leaf.not_valid_before_utc.isoformat() if e.svid else None,
                chain=e.svid.chain_pem().decode() if e.svid else None,
            )
            for e in sorted(self._entries.values(), key=lambda e: e.identity)
        ]

    # -- internals --------------------------------------------------------------------------------------

    async def _issue(self, entry: _Entry) -> Svid:
        key = generate_key()
        csr = make_csr(key, entry.identity)
        call = functools.partial(
            self._signer.create_certificate,
            csr,
            ttl_seconds=self._ttl_seconds,
            impersonate=entry.identity if self._impersonate else None,
        )
        try:
            chain = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
            # The roots as they are now: a new root reaches the bundle before any leaf it signs.
            svid = accept_issued(chain, key, entry.identity, self._bundle.certs())
        except SecretsError as exc:
            entry.last_error = str(exc)
            raise
        self._use(entry, svid)
        entry.generation += 1
        self._bundle_changed()  # the roots may have changed meanwhile (a CA client looked at the file)
        entry.last_error = None
        entry.schedule.issued(svid.not_before, svid.not_after)
        log.info("certificate for %s valid until %s", entry.identity, svid.leaf.not_valid_after_utc.isoformat())
        return svid

    def _use(self, entry: _Entry, svid: Svid) -> None:
        entry.server_ctx = server_context(svid, alpn=self._alpn)
        entry.client_ctx = client_context(svid, alpn=self._alpn)
        entry.svid = svid

    def _start_renewal(self, entry: _Entry) -> None:
        if entry.cancel is not None or self._entries.get(entry.identity) is not entry:
            return  # renewing already, or forgotten meanwhile
        if self._nursery is None:
            raise SecretsError("SecretManager is not running: start it with nursery.start(manager.run)")
        entry.cancel = trio.CancelScope()
        self._nursery.start_soon(self._renew_loop, entry)

    async def _renew_loop(self, entry: _Entry) -> None:
        assert entry.cancel is not None
        with entry.cancel:
            while True:
                now = self._clock()
                wait = entry.schedule.delay(now)
                if self._impersonate:
                    wait = min(wait, max(0.0, entry.last_used + self._forget_after - now))
                with trio.move_on_after(wait):
                    await entry.wake.wait()
                entry.wake = trio.Event()
                idle = self._clock() - entry.last_used
                if self._impersonate and idle >= self._forget_after:
                    log.info("nobody asked for %s for %.0fs: forgotten", entry.identity, idle)
                    self.forget(entry.identity)
                    return
                if entry.schedule.delay(self._clock()) > 0:
                    continue
                async with entry.lock:
                    try:
                        await self._issue(entry)
                    except SecretsError as exc:
                        retry_in = entry.schedule.failed(self._clock()) - self._clock()
                        log.warning(
                            "renewing %s failed (%s); retrying in %.1fs", entry.identity, exc, retry_in
                        )
