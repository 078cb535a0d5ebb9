"""Rotating the CA's root without restarting anything: three phases, driven by the clock.

    rotator = RootRotator(authority, home / "ca")
    rotator.start(propagation=timedelta(minutes=1), overlap=timedelta(hours=1))   # meshctl ca rotate-root
    rotator.advance()          # the control plane calls this every second or so; it moves the phases on

    phase         trust bundle (root-cert.pem)   signs new leaves   until
    propagating   old root, new root             old root           activate_at = start + propagation
    overlap       new root, old root             new root           retire_at = activate_at + overlap
    idle          new root                       new root           (the next rotation)

`propagation` is the time every process needs to read the new bundle before any leaf from the new root
exists (node agents and waypoints check `root-cert.pem` every few seconds, a Kubernetes ConfigMap takes
up to a minute or so to reach a pod).  When the new root starts signing, the bundle lists it first, which
tells the secret managers to renew their certificates at once; `overlap` is how long leaves of the old
root are still trusted, so it must outlast the renewal of every certificate (and the certificates of
anything that cannot renew early).  The control plane's serving certificate is renewed when the signing
key changes (`ca.serving`).

Choice: only a CA whose signing certificate is its root (the generated one) is rotated here; a CA
plugged in from an operator's PKI (an intermediate in `cacerts`) is rotated by replacing those files.

The state of a rotation is a file beside the CA files, `rotation.json` (phases and times, and the bundle
it started from), and the new key waits in `next/` until it signs.  Every step writes its intent first
and is idempotent, so a crash anywhere is finished by the next `recover()` (before the CA is loaded) and
`advance()`.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.authority import (
    CA_CERT,
    CA_KEY,
    CertificateAuthority,
    generate_root,
    load_pem_certs,
    to_pem,
    write_bundle,
    write_ca_dir,
)
from ca.errors import CAError, CAStoreError
from mesh.files import write_atomic

log = logging.getLogger(__name__)

ROTATION_FILE = "rotation.json"
NEXT_DIR = "next"
PROPAGATING, OVERLAP, IDLE = "propagating", "overlap", "idle"
DEFAULT_PROPAGATION = datetime.timedelta(minutes=1)
DEFAULT_OVERLAP = datetime.timedelta(hours=1)


class RotationError(CAError):
    """A root rotation cannot start (one is under way, or the CA's root is not its own)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class RotationPlan:
    """A rotation under way: when the new root signs, when the old one leaves the bundle."""

    activate_at: datetime.datetime
    retire_at: datetime.datetime
    previous_bundle: tuple[x509.Certificate, ...]  # the roots trusted before it started

    def phase(self, now: datetime.datetime) -> str:
        """Where the clock says the rotation should be (pure)."""
        if now < self.activate_at:
            return PROPAGATING
        if now < self.retire_at:
            return OVERLAP
        return IDLE

    def to_json(self, phase: str) -> dict[str, Any]:
        return {"phase": phase, "activateAt": self.activate_at.isoformat(), "retireAt": self.retire_at.isoformat(),
                "previousBundle": "".join(to_pem(c) for c in self.previous_bundle)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> tuple[RotationPlan, str]:
        try:
            plan = cls(datetime.datetime.fromisoformat(data["activateAt"]),
                       datetime.datetime.fromisoformat(data["retireAt"]),
                       tuple(load_pem_certs(str(data["previousBundle"]).encode(), where)))
            phase = str(data["phase"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CAStoreError(f"{where}: not a root rotation record ({exc}); remove it to abandon the rotation") from None
        if phase not in (PROPAGATING, OVERLAP):
            raise CAStoreError(f"{where}: unknown phase {phase!r}")
        return plan, phase


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


class RootRotator:
    """Starts and advances root rotations of `authority`, whose files are in `ca_dir` (thread-safe
    enough for its two callers: the apply API starts, one control plane task advances)."""

    def __init__(self, authority: CertificateAuthority, ca_dir: Path,
                 clock: Callable[[], datetime.datetime] = _now) -> None:
        self.authority = authority
        self.ca_dir = ca_dir
        self._clock = clock
        self._lock = threading.RLock()
        self._plan: RotationPlan | None = None
        self._phase = IDLE
        record = ca_dir / ROTATION_FILE
        if record.exists():
            self._plan, self._phase = _read(record)
            self._apply_bundle(self._phase)  # the files may be a step behind the record after a crash

    # ---- before the CA is loaded --------------------------------------------------------------------

    @staticmethod
    def recover(ca_dir: Path) -> None:
        """Finish a switch of the signing key that a crash interrupted, so that the CA files agree again
        (call before loading the CA from `ca_dir`)."""
        record = ca_dir / ROTATION_FILE
        if not record.exists() or not (ca_dir / NEXT_DIR).is_dir():
            return
        plan, phase = _read(record)
        if phase == OVERLAP:
            _install_next(ca_dir, plan.previous_bundle)

    # ---- what the apply API calls -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The phase, its times, and the roots of the bundle (the signing one first)."""
        with self._lock:
            return self._status()

    def _status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self._phase,
                               "signingRoot": fingerprint(self.authority.root),
                               "roots": [{"subject": c.subject.rfc4514_string(), "sha256": fingerprint(c),
                                          "notAfter": c.not_valid_after_utc.isoformat()}
                                         for c in self.authority.bundle]}
        if self._plan is not None and self._phase != IDLE:
            out.update(activateAt=self._plan.activate_at.isoformat(), retireAt=self._plan.retire_at.isoformat())
        return out

    def start(self, propagation: datetime.timedelta = DEFAULT_PROPAGATION,
              overlap: datetime.timedelta = DEFAULT_OVERLAP) -> dict[str, Any]:
        """Make a new root and put it in the bundle; it signs after `propagation`, and the old root leaves
        the bundle `overlap` later.  `RotationError` if a rotation is under way or the root is not ours."""
        with self._lock:
            return self._start(propagation, overlap)

    def _start(self, propagation: datetime.timedelta, overlap: datetime.timedelta) -> dict[str, Any]:
        if propagation < datetime.timedelta(0) or overlap < datetime.timedelta(0):
            raise RotationError("a root rotation's propagation and overlap cannot be negative")
        if self._phase != IDLE:
            raise RotationError(f"a root rotation is already under way (phase {self._phase}); "
                                "wait for it to finish (meshctl ca status)")
        authority = self.authority
        if len(authority.chain) != 1:
            raise RotationError("this CA signs with an intermediate plugged in from your PKI (cacerts): rotate it "
                                "by replacing the cacerts files, not with a generated root")
        now = self._clock()
        key, root = generate_root(authority.trust_domain)
        next_dir = self.ca_dir / NEXT_DIR
        shutil.rmtree(next_dir, ignore_errors=True)
        next_dir.mkdir(mode=0o700)
        write_atomic(next_dir / CA_KEY, _key_pem(key), 0o600)
        write_atomic(next_dir / CA_CERT, to_pem(root).encode(), 0o644)
        plan = RotationPlan(now + propagation, now + propagation + overlap, authority.bundle)
        self._record(plan, PROPAGATING)
        self._apply_bundle(PROPAGATING)
        log.info("root rotation started: new root %s trusted now, signs from %s, old root trusted until %s",
                 fingerprint(root), plan.activate_at.isoformat(), plan.retire_at.isoformat())
        self._advance(now)  # a zero propagation signs at once
        return self._status()

    # ---- what the control plane calls every second ------------------------------------------------------

    def advance(self, now: datetime.datetime | None = None) -> bool:
        """Move the rotation to the phase the clock says; True if it moved."""
        with self._lock:
            return self._advance(now)

    def _advance(self, now: datetime.datetime | None) -> bool:
        plan = self._plan
        if plan is None or self._phase == IDLE:
            return False
        now = now or self._clock()
        moved = False
        if self._phase == PROPAGATING and plan.phase(now) != PROPAGATING:
            self._record(plan, OVERLAP)  # intent first: recover() finishes the switch after a crash
            _install_next(self.ca_dir, plan.previous_bundle)
            self._load_signing()
            self._phase = OVERLAP
            moved = True
            log.info("root rotation: the new root %s signs now", fingerprint(self.authority.root))
        if self._phase == OVERLAP and plan.phase(now) == IDLE:
            self.authority.trust(())
            write_bundle(self.ca_dir, self.authority.bundle)
            (self.ca_dir / ROTATION_FILE).unlink(missing_ok=True)
            self._phase, self._plan = IDLE, None
            moved = True
            log.info("root rotation done: the old root left the trust bundle")
        return moved

    # ---- internals ----------------------------------------------------------------------------------

    def _record(self, plan: RotationPlan, phase: str) -> None:
        write_atomic(self.ca_dir / ROTATION_FILE, (json.dumps(plan.to_json(phase), indent=2) + "\n").encode(), 0o600)
        self._plan, self._phase = plan, phase

    def _apply_bundle(self, phase: str) -> None:
        """Make the CA and `root-cert.pem` trust what `phase` trusts (idempotent)."""
        assert self._plan is not None
        if phase == PROPAGATING:
            new = load_pem_certs((self.ca_dir / NEXT_DIR / CA_CERT).read_bytes(), str(self.ca_dir / NEXT_DIR / CA_CERT))
            self.authority.trust([*self._plan.previous_bundle, *new])
        else:
            self.authority.trust(self._plan.previous_bundle)
        write_bundle(self.ca_dir, self.authority.bundle)

    def _load_signing(self) -> None:
        loaded = CertificateAuthority.load(self.ca_dir, trust_domain=self.authority.trust_domain)
        self.authority.use(loaded.signing_key, loaded.chain, loaded.bundle)


def _read(record: Path) -> tuple[RotationPlan, str]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise CAStoreError(f"{record}: cannot read the root rotation record ({exc})") from None
    return RotationPlan.from_json(data, str(record))


def _install_next(ca_dir: Path, previous_bundle: Sequence[x509.Certificate]) -> None:
    """The new root (in `next/`) becomes the CA's signing root; the bundle keeps the previous roots after
    it.  Idempotent: `next/` goes last."""
    next_dir = ca_dir / NEXT_DIR
    if not next_dir.is_dir():
        return
    key = serialization.load_pem_private_key((next_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAStoreError(f"{next_dir / CA_KEY}: not an ECDSA or RSA key")
    root = load_pem_certs((next_dir / CA_CERT).read_bytes(), str(next_dir / CA_CERT))[0]
    write_ca_dir(ca_dir, key, [root], previous_bundle)
    shutil.rmtree(next_dir)
