"""Who is calling the CA.

An `Authenticator` turns the request's gRPC metadata (`authorization: Bearer <token>`) into a `Caller`:
a node agent for a named node, or a workload with its own identity.  The local cluster uses
`JwtAuthenticator` over tokens minted by `NodeTokenIssuer`, which the control plane creates at cluster
start and keeps in its state directory.  On Kubernetes, `ca.tokenreview.TokenReviewAuthenticator` has
the same `authenticate()` method: `system:serviceaccount:<ns>:<sa>` is a `Workload`, and the node
agent's service account a `NodeAgent` of the node its token's pod is scheduled on.

Token format (JWT, EdDSA over Ed25519 or ES256 over P-256):

    iss   the issuer name (default "mesh-controlplane")
    aud   the audience (default "istio-ca", the audience Istio's agents use for the CA and discovery)
    sub   "node:<node name>" or the workload's SPIFFE ID
    kind  "node" or "workload"
    node  the node name (node tokens)
    iat, exp
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ca.errors import AuthenticationError, CAStoreError
from mesh.files import write_atomic
from mesh.identity import IdentityError, SpiffeId

DEFAULT_ISSUER = "mesh-controlplane"
DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_NODE_TOKEN_TTL = datetime.timedelta(days=365)
ALGORITHMS = ("EdDSA", "ES256")
MAX_TOKEN_BYTES = 8 * 1024

TokenKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class NodeAgent:
    """The node agent of `node`: may ask for identities of pods scheduled there."""

    node: str

    def __str__(self) -> str:
        return f"node agent of {self.node}"


@dataclass(frozen=True)
class Workload:
    """A workload (a waypoint, a pod with its own token): may ask only for its own identity."""

    identity: SpiffeId

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


def _algorithm(key: TokenKey | VerifyKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise CAStoreError(f"token keys must be Ed25519 or ECDSA P-256, not {key.curve.name}")


class JwtAuthenticator:
    """Checks tokens signed by one of `keys` for `audience` from `issuer`, and not expired."""

    def __init__(
        self,
        keys: Sequence[VerifyKey],
        *,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = DEFAULT_ISSUER,
        leeway: datetime.timedelta = datetime.timedelta(seconds=0),
    ) -> None:
        if not keys:
            raise CAStoreError("a JWT authenticator needs at least one verification key")
        self.keys = tuple(keys)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        return self.caller_of(bearer_token(metadata))

    def caller_of(self, token: str) -> Caller:
        claims = self._verified_claims(token)
        kind = claims.get("kind")
        if kind == "node":
            node = claims.get("node")
            if not isinstance(node, str) or not node or claims.get("sub") != f"node:{node}":
                raise AuthenticationError("node token has no valid 'node' claim matching its subject")
            return NodeAgent(node)
        if kind == "workload":
            try:
                return Workload(SpiffeId.parse(str(claims.get("sub"))))
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
        candidates = [k for k in self.keys if _algorithm(k) == alg]
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


class NodeTokenIssuer:
    """Mints the tokens the control plane hands to node agents (and, if wanted, workloads).

    The signing key lives in one file (mode 0600) in the control plane's state directory, so tokens
    minted at cluster start stay valid across control plane restarts.
    """

    def __init__(
        self,
        key: TokenKey,
        *,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str = DEFAULT_ISSUER,
    ) -> None:
        self.key = key
        self.algorithm = _algorithm(key)
        self.audience = audience
        self.issuer = issuer

    @classmethod
    def generate(cls, **kwargs: Any) -> NodeTokenIssuer:
        return cls(ed25519.Ed25519PrivateKey.generate(), **kwargs)

    @classmethod
    def load_or_create(cls, key_file: str | os.PathLike[str], **kwargs: Any) -> NodeTokenIssuer:
        """Load the token key from `key_file`, creating an Ed25519 key there (mode 0600) if absent."""
        path = Path(key_file)
        if not path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Complete and private before it has its name (a crash leaves no half key), and never over
            # a key another process made meanwhile: link() refuses an existing name.
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            write_atomic(tmp, pem, mode=0o600)
            try:
                os.link(tmp, path)
                return cls(key, **kwargs)
            except FileExistsError:
                pass  # someone else's key won: use it
            finally:
                tmp.unlink(missing_ok=True)
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CAStoreError(f"{path}: cannot load the token signing key ({exc})") from None
        if not isinstance(loaded, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise CAStoreError(f"{path}: token keys must be Ed25519 or ECDSA P-256")
        return cls(loaded, **kwargs)

    def mint_node_token(
        self,
        node: str,
        *,
        ttl: datetime.timedelta = DEFAULT_NODE_TOKEN_TTL,
        now: datetime.datetime | None = None,
    ) -> str:
        if not node:
            raise CAStoreError("a node token needs a node name")
        return self._mint({"kind": "node", "node": node, "sub": f"node:{node}"}, ttl, now)

    def mint_workload_token(
        self,
        identity: SpiffeId,
        *,
        ttl: datetime.timedelta = DEFAULT_NODE_TOKEN_TTL,
        now: datetime.datetime | None = None,
    ) -> str:
        return self._mint({"kind": "workload", "sub": identity.uri}, ttl, now)

    def _mint(self, claims: dict[str, Any], ttl: datetime.timedelta, now: datetime.datetime | None) -> str:
        now = now or datetime.datetime.now(datetime.UTC)
        payload = {
            **claims,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(payload, self.key, algorithm=self.algorithm)

    @property
    def public_key(self) -> VerifyKey:
        return self.key.public_key()

    def authenticator(self, **kwargs: Any) -> JwtAuthenticator:
        """An authenticator that accepts this issuer's tokens."""
        kwargs.setdefault("audience", self.audience)
        kwargs.setdefault("issuer", self.issuer)
        return JwtAuthenticator([self.public_key], **kwargs)
