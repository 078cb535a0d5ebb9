"""JWT node tokens: minting, checking, and every way a token can be wrong."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca.auth import JwtAuthenticator, NodeAgent, NodeTokenIssuer, Workload
from ca.errors import AuthenticationError
from mesh.identity import SpiffeId


def md(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_node_token_round_trip() -> None:
    issuer = NodeTokenIssuer.generate()
    caller = issuer.authenticator().authenticate(md(issuer.mint_node_token("node-a")))
    assert caller == NodeAgent("node-a")


def test_workload_token_round_trip() -> None:
    issuer = NodeTokenIssuer.generate()
    ident = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/waypoint")
    assert issuer.authenticator().authenticate(md(issuer.mint_workload_token(ident))) == Workload(ident)


def test_es256_keys_work_too() -> None:
    issuer = NodeTokenIssuer(ec.generate_private_key(ec.SECP256R1()))
    token = issuer.mint_node_token("node-b")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert issuer.authenticator().authenticate(md(token)) == NodeAgent("node-b")


def test_key_file_persisted_with_mode_0600(tmp_path: Path) -> None:
    key_file = tmp_path / "state" / "node-token-key.pem"
    first = NodeTokenIssuer.load_or_create(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    token = first.mint_node_token("node-a")
    again = NodeTokenIssuer.load_or_create(key_file)  # control plane restart
    assert again.authenticator().authenticate(md(token)) == NodeAgent("node-a")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "no credentials"),
        ({"authorization": "Basic abc"}, "must be 'Bearer <token>'"),
        ({"authorization": "Bearer "}, "must be 'Bearer <token>'"),
        ({"authorization": "Bearer not-a-jwt"}, "not a JWT"),
    ],
)
def test_missing_or_malformed(metadata: dict[str, str], message: str) -> None:
    with pytest.raises(AuthenticationError, match=message):
        NodeTokenIssuer.generate().authenticator().authenticate(metadata)


def test_expired() -> None:
    issuer = NodeTokenIssuer.generate()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    token = issuer.mint_node_token("node-a", ttl=datetime.timedelta(hours=1), now=past)
    with pytest.raises(AuthenticationError, match="expired"):
        issuer.authenticator().authenticate(md(token))


def test_wrong_audience() -> None:
    issuer = NodeTokenIssuer.generate()
    other = NodeTokenIssuer(issuer.key, audience="something-else")
    with pytest.raises(AuthenticationError, match="another audience"):
        issuer.authenticator().authenticate(md(other.mint_node_token("node-a")))


def test_wrong_issuer() -> None:
    issuer = NodeTokenIssuer.generate()
    other = NodeTokenIssuer(issuer.key, issuer="someone-else")
    with pytest.raises(AuthenticationError, match="issuer"):
        issuer.authenticator().authenticate(md(other.mint_node_token("node-a")))


def test_foreign_signed() -> None:
    ours, theirs = NodeTokenIssuer.generate(), NodeTokenIssuer.generate()
    with pytest.raises(AuthenticationError, match="not signed by this control plane"):
        ours.authenticator().authenticate(md(theirs.mint_node_token("node-a")))


def test_unsigned_and_hmac_tokens_refused() -> None:
    issuer = NodeTokenIssuer.generate()
    claims = {"kind": "node", "node": "node-a", "sub": "node:node-a", "aud": "istio-ca", "iss": "mesh-controlplane",
              "iat": 0, "exp": 2**40}
    for token in (jwt.encode(claims, "", algorithm="none"), jwt.encode(claims, "k" * 32, algorithm="HS256")):
        with pytest.raises(AuthenticationError, match="algorithm"):
            issuer.authenticator().authenticate(md(token))


def test_node_claim_must_match_subject() -> None:
    issuer = NodeTokenIssuer.generate()
    token = issuer._mint({"kind": "node", "node": "node-a", "sub": "node:node-b"}, datetime.timedelta(hours=1), None)
    with pytest.raises(AuthenticationError, match="node"):
        issuer.authenticator().authenticate(md(token))


def test_authenticator_needs_a_key() -> None:
    from ca.errors import CAStoreError

    with pytest.raises(CAStoreError):
        JwtAuthenticator([])
