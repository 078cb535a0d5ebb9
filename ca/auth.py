"""Who is calling the CA.

An `Authenticator` turns the request's gRPC metadata (`authorization: Bearer <token>`) into a `Caller`:
a node agent for a named node, or a workload with its own identity.  The local cluster uses
`JwtAuthenticator` over tokens minted by `NodeTokenIssuer`, which the control plane creates at cluster
start and keeps in its state directory.  On Kubernetes, `ca.tokenreview.TokenReviewAuthenticator` has
the same `authenticate()` method: `system:serviceaccount:<ns>:<sa>` is a `Workload`, and the node
agent's service account a `NodeAgent` of the node its token's pod is scheduled on.

Token format (JWT, EdDSA over Ed25519 or ES256 over P-256):

    header  alg, typ, kid: the signing key's RFC 7638 thumbprint (`key_id`)
    iss     the issuer name (default "mesh-controlplane")
    aud     the audience (default "istio-ca", the audience Istio's agents use for the CA and discovery)
    sub     "node:<node name>" or the workload's SPIFFE ID
    kind    "node" or "workload"
    node    the node name (node tokens)
    iat, exp, jti

Tokens are short-lived (`DEFAULT_TOKEN_TTL`, one hour, like a projected service-account token) and their
holders are given fresh ones before they expire (in the local cluster by its controller, which plays the
kubelet: `localcluster.projected`).  The signing key is a `TokenKeyRing`: one current key that signs, and
the keys it replaced, each still accepted until the end of its overlap, then refused.  Rotating the key
(`TokenKeyRing.rotate`, `meshctl ca rotate-token-key`) is how every token it signed is revoked: after the
overlap, or at once with an overlap of zero.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ca.errors import AuthenticationError, CAStoreError
from mesh.files import write_atomic
from mesh.identity import IdentityError, SpiffeId

log = logging.getLogger(__name__)

DEFAULT_ISSUER = "mesh-controlplane"
DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_TOKEN_TTL = datetime.timedelta(hours=1)
DEFAULT_NODE_TOKEN_TTL = DEFAULT_TOKEN_TTL  # the name it had when only node agents had tokens
RETIRING_KEYS_SUFFIX = ".retiring.json"  # beside the key file: the keys still accepted, and until when
ALGORITHMS = ("EdDSA", "ES256")
MAX_TOKEN_BYTES = 8 * 1024

TokenKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class NodeAgent:
    """The node agent of `node`: may ask for identities of pods scheduled there.  `expires`: when its
    credential does (Unix seconds), when the authenticator knows it."""

    node: str
    expires: float | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"node agent of {self.node}"


@dataclass(frozen=True)
class Workload:
    """A workload (a waypoint, a pod with its own token): may ask only for its own identity."""

    identity: SpiffeId
    expires: float | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"workload {self.identity}"


Caller = NodeAgent | Workload


class Authenticator(Protocol):
    """Maps gRPC request metadata (lower-case keys, first value of each) to the caller."""

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        """The caller, or raise `AuthenticationError` saying what is wrong with its credentials."""
        ...


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token from `authorization: Bearer <token>`, or `AuthenticationError`."""
    value = metadata.get("authorization")
    if value is None:
        raise AuthenticationError("no credentials: send 'authorization: Bearer <token>' metadata")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("authorization metadata must be 'Bearer <token>'")
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthenticationError(f"token is {len(token)} bytes; at most {MAX_TOKEN_BYTES} are accepted")
    return token


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def key_id(key: TokenKey | VerifyKey) -> str:
    """The key's id, `kid` in token headers: its RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) else key
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    else:
        numbers = public.public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _b64url(numbers.x.to_bytes(32, "big")),
               "y": _b64url(numbers.y.to_bytes(32, "big"))}
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


def _algorithm(key: TokenKey | VerifyKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise CAStoreError(f"token keys must be Ed25519 or ECDSA P-256, not {key.curve.name}")


class KeySource(Protocol):
    """Where an authenticator finds the keys it accepts now: `TokenKeyRing` is one."""

    def verification_keys(self) -> Mapping[str, VerifyKey]:
        """Key id -> public key, of every key whose tokens are accepted now."""
        ...


class _FixedKeys:
    def __init__(self, keys: Sequence[VerifyKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    def verification_keys(self) -> Mapping[str, VerifyKey]:
        return self._keys


class JwtAuthenticator:
    """Checks tokens signed by one of `keys` (fixed, or a `KeySource` such as the issuer's key ring, asked
    on every call) for `audience` from `issuer`, and not expired.  A token naming its key (`kid`) is
    checked with that key only; one that names none is tried with every key."""

    def __init__(
        self,
        keys: Sequence[VerifyKey] | KeySource,
        *,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = DEFAULT_ISSUER,
        leeway: datetime.timedelta = datetime.timedelta(seconds=0),
    ) -> None:
        if isinstance(keys, Sequence):
            if not keys:
                raise CAStoreError("a JWT authenticator needs at least one verification key")
            keys = _FixedKeys(keys)
        self.keys: KeySource = keys
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        return self.caller_of(bearer_token(metadata))

    def caller_of(self, token: str) -> Caller:
        claims = self._verified_claims(token)
        kind = claims.get("kind")
        expires = float(claims["exp"])
        if kind == "node":
            node = claims.get("node")
            if not isinstance(node, str) or not node or claims.get("sub") != f"node:{node}":
                raise AuthenticationError("node token has no valid 'node' claim matching its subject")
            return NodeAgent(node, expires)
        if kind == "workload":
            try:
                return Workload(SpiffeId.parse(str(claims.get("sub"))), expires)
            except IdentityError as exc:
                raise AuthenticationError(f"workload token subject: {exc}") from None
        raise AuthenticationError(f"token kind {kind!r} is neither 'node' nor 'workload'")

    def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthenticationError(f"token is not a JWT ({exc})") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise AuthenticationError(f"token algorithm {alg!r} is not accepted (use one of {', '.join(ALGORITHMS)})")
        keys = self.keys.verification_keys()
        kid = header.get("kid")
        if kid is not None:
            key = keys.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise AuthenticationError(
                    f"token is not signed by this control plane's token key: its key {str(kid)[:64]!r} is not "
                    "accepted (rotated out, or another issuer's); ask the control plane for a new token")
            candidates = [key] if _algorithm(key) == alg else []
        else:
            candidates = [k for k in keys.values() if _algorithm(k) == alg]
        if not candidates:
            raise AuthenticationError("token is not signed by this control plane's token key")
        error: AuthenticationError | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={"require": ["exp", "iat", "aud", "iss", "sub"]},
                )
                return claims
            except jwt.InvalidSignatureError:
                error = AuthenticationError("token is not signed by this control plane's token key")
            except jwt.ExpiredSignatureError:
                raise AuthenticationError("token has expired: ask the control plane for a new one") from None
            except jwt.InvalidAudienceError:
                raise AuthenticationError(
                    f"token is for another audience; this CA accepts audience {self.audience!r}"
                ) from None
            except jwt.InvalidIssuerError:
                raise AuthenticationError(f"token issuer is not {self.issuer!r}") from None
            except jwt.MissingRequiredClaimError as exc:
                raise AuthenticationError(f"token lacks the {exc.claim!r} claim") from None
            except jwt.InvalidTokenError as exc:
                raise AuthenticationError(f"token is invalid: {exc}") from None
        assert error is not None
        raise error


@dataclass(frozen=True)
class RetiringKey:
    """A key that signed tokens before the current one: accepted until `until`, then refused."""

    kid: str
    key: VerifyKey
    until: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _private_pem(key: TokenKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(key: VerifyKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class TokenKeyRing:
    """The token signing key and the keys it replaced (`RetiringKey`s, public halves only), thread-safe.

    Kept in the control plane's state directory when it has a `key_file`: the current private key in
    that file (mode 0600), the retiring keys in `<key_file>.retiring.json`, so a restart keeps accepting
    what it accepted.  `rotate(overlap)` makes a new current key; the old one is accepted for `overlap`
    more, then dropped (its tokens refused).
    """

    def __init__(self, current: TokenKey, retiring: Sequence[RetiringKey] = (), *, key_file: Path | None = None,
                 since: datetime.datetime | None = None, clock: Callable[[], datetime.datetime] = _now) -> None:
        _algorithm(current)
        self._lock = threading.Lock()
        self._current = current
        self._kid = key_id(current)
        self._retiring = tuple(r for r in retiring if r.kid != self._kid)
        self._key_file = key_file
        self._clock = clock
        self.since = since or clock()  # when the current key became current

    @classmethod
    def load_or_create(cls, key_file: str | os.PathLike[str]) -> TokenKeyRing:
        """The ring kept at `key_file` (see the class docstring), with a new Ed25519 key if there is none."""
        path = Path(key_file)
        if not path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Complete and private before it has its name (a crash leaves no half key), and never over
            # a key another process made meanwhile: link() refuses an existing name.
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            write_atomic(tmp, _private_pem(key), mode=0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # someone else's key won: use it
            finally:
                tmp.unlink(missing_ok=True)
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            since = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
        except (OSError, ValueError, TypeError) as exc:
            raise CAStoreError(f"{path}: cannot load the token signing key ({exc})") from None
        if not isinstance(loaded, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise CAStoreError(f"{path}: token keys must be Ed25519 or ECDSA P-256")
        return cls(loaded, _load_retiring(_retiring_file(path)), key_file=path, since=since)

    @property
    def current(self) -> TokenKey:
        return self._current

    @property
    def current_kid(self) -> str:
        return self._kid

    def signing_key(self) -> tuple[str, TokenKey]:
        with self._lock:
            return self._kid, self._current

    def retiring(self, now: datetime.datetime | None = None) -> tuple[RetiringKey, ...]:
        """The replaced keys still accepted at `now`."""
        now = now or self._clock()
        with self._lock:
            return tuple(r for r in self._retiring if r.until > now)

    def verification_keys(self) -> Mapping[str, VerifyKey]:
        keys: dict[str, VerifyKey] = {r.kid: r.key for r in self.retiring()}
        with self._lock:
            keys[self._kid] = self._current.public_key()
        return keys

    def rotate(self, overlap: datetime.timedelta, now: datetime.datetime | None = None) -> None:
        """A new current key; the one it replaces is accepted until `now + overlap` (not at all for 0)."""
        if overlap < datetime.timedelta(0):
            raise CAStoreError(f"a key rotation's overlap cannot be negative ({overlap})")
        now = now or self._clock()
        new = ed25519.Ed25519PrivateKey.generate()
        with self._lock:
            old = RetiringKey(self._kid, self._current.public_key(), now + overlap)
            retiring = tuple(r for r in self._retiring if r.until > now) + ((old,) if overlap else ())
            if self._key_file is not None:
                # The retiring keys first: a crash before the new key is written leaves the old key current
                # and also listed as retiring, which is harmless; the other order could lose it.
                _save_retiring(_retiring_file(self._key_file), retiring)
                write_atomic(self._key_file, _private_pem(new), mode=0o600)
            self._current, self._kid, self._retiring, self.since = new, key_id(new), retiring, now
        log.info("token signing key rotated: %s is current; %s accepted until %s", self._kid, old.kid,
                 old.until.isoformat() if overlap else "now (revoked)")

    def status(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        """What `meshctl ca` shows: the current key and the retiring ones with the end of their overlap."""
        retiring = self.retiring(now)
        with self._lock:
            return {"current": self._kid, "algorithm": _algorithm(self._current), "since": self.since.isoformat(),
                    "retiring": [{"kid": r.kid, "until": r.until.isoformat()} for r in retiring]}


def _retiring_file(key_file: Path) -> Path:
    return key_file.with_name(key_file.name.removesuffix(".pem") + RETIRING_KEYS_SUFFIX)


def _load_retiring(path: Path) -> list[RetiringKey]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        out = []
        for entry in data["retiring"]:
            key = serialization.load_pem_public_key(str(entry["publicKey"]).encode())
            if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
                raise ValueError("not an Ed25519 or ECDSA key")
            out.append(RetiringKey(key_id(key), key, datetime.datetime.fromisoformat(str(entry["until"]))))
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CAStoreError(f"{path}: cannot read the retiring token keys ({exc}); remove the file to refuse "
                           "every token not signed by the current key") from None


def _save_retiring(path: Path, retiring: Sequence[RetiringKey]) -> None:
    data = {"retiring": [{"kid": r.kid, "publicKey": _public_pem(r.key), "until": r.until.isoformat()}
                         for r in retiring]}
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


class NodeTokenIssuer:
    """Mints the tokens the control plane hands to node agents and workloads (waypoints).

    Its key ring lives in the control plane's state directory (`TokenKeyRing.load_or_create`), so the
    tokens it minted stay valid across control plane restarts, until they expire or their key retires.
    `ttl` is the default lifetime and the most a caller may ask for (`lifetime`).
    """

    def __init__(
        self,
        key: TokenKey | TokenKeyRing,
        *,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = DEFAULT_ISSUER,
        ttl: datetime.timedelta = DEFAULT_TOKEN_TTL,
    ) -> None:
        if ttl <= datetime.timedelta(0):
            raise CAStoreError(f"a token lifetime must be positive, not {ttl}")
        self.ring = key if isinstance(key, TokenKeyRing) else TokenKeyRing(key)
        self.audience = audience
        self.issuer = issuer
        self.ttl = ttl

    @classmethod
    def generate(cls, **kwargs: Any) -> NodeTokenIssuer:
        return cls(ed25519.Ed25519PrivateKey.generate(), **kwargs)

    @classmethod
    def load_or_create(cls, key_file: str | os.PathLike[str], **kwargs: Any) -> NodeTokenIssuer:
        """The key ring at `key_file`, creating an Ed25519 key there (mode 0600) if absent."""
        return cls(TokenKeyRing.load_or_create(key_file), **kwargs)

    @property
    def key(self) -> TokenKey:
        """The current signing key."""
        return self.ring.current

    @property
    def algorithm(self) -> str:
        return _algorithm(self.ring.current)

    def lifetime(self, requested: datetime.timedelta | None) -> datetime.timedelta:
        """The lifetime of a token asked for with `requested` (None: the default): at most `ttl`."""
        if requested is None:
            return self.ttl
        if requested <= datetime.timedelta(0):
            raise CAStoreError(f"a token lifetime must be positive, not {requested}")
        return min(requested, self.ttl)

    def mint_node_token(
        self,
        node: str,
        *,
        ttl: datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
    ) -> str:
        if not node:
            raise CAStoreError("a node token needs a node name")
        return self._mint({"kind": "node", "node": node, "sub": f"node:{node}"}, ttl, now)

    def mint_workload_token(
        self,
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
    ) -> str:
        return self._mint({"kind": "workload", "sub": identity.uri}, ttl, now)

    def _mint(self, claims: dict[str, Any], ttl: datetime.timedelta | None, now: datetime.datetime | None) -> str:
        """`ttl` as given (tests mint expired tokens); callers bound what others ask for with `lifetime`."""
        now = now or datetime.datetime.now(datetime.UTC)
        kid, key = self.ring.signing_key()
        payload = {
            **claims,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": int(now.timestamp()),
            "exp": int((now + (self.ttl if ttl is None else ttl)).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(payload, key, algorithm=_algorithm(key), headers={"kid": kid})

    def rotate_key(self, overlap: datetime.timedelta) -> dict[str, Any]:
        """A new signing key; tokens of the current one are accepted for `overlap` more.  The ring's status."""
        self.ring.rotate(overlap)
        return self.ring.status()

    @property
    def public_key(self) -> VerifyKey:
        return self.ring.current.public_key()

    def authenticator(self, **kwargs: Any) -> JwtAuthenticator:
        """An authenticator that accepts this issuer's tokens (of its current and retiring keys)."""
        kwargs.setdefault("audience", self.audience)
        kwargs.setdefault("issuer", self.issuer)
        return JwtAuthenticator(self.ring, **kwargs)
