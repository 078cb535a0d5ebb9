"""`ca.auth.TokenKeyRing`: tokens name their key, rotation keeps the old key for the overlap only, and
the ring is kept across restarts."""

from __future__ import annotations

import datetime
from pathlib import Path

import jwt
import pytest

from ca.auth import NodeAgent, NodeTokenIssuer, TokenKeyRing, key_id
from ca.errors import AuthenticationError

T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def md(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_token_names_its_key_by_thumbprint() -> None:
    issuer = NodeTokenIssuer.generate()
    token = issuer.mint_node_token("n1")
    assert jwt.get_unverified_header(token)["kid"] == key_id(issuer.key) == key_id(issuer.public_key)
    assert len(key_id(issuer.key)) == 43  # base64url SHA-256


def test_the_default_lifetime_is_an_hour_and_requests_are_capped() -> None:
    issuer = NodeTokenIssuer.generate(ttl=datetime.timedelta(minutes=10))
    assert issuer.lifetime(None) == datetime.timedelta(minutes=10)
    assert issuer.lifetime(datetime.timedelta(days=1)) == datetime.timedelta(minutes=10)
    assert issuer.lifetime(datetime.timedelta(seconds=30)) == datetime.timedelta(seconds=30)
    claims = jwt.decode(NodeTokenIssuer.generate().mint_node_token("n1"), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600


def test_rotation_keeps_the_old_key_for_the_overlap_only() -> None:
    now = [T0]
    ring = TokenKeyRing(NodeTokenIssuer.generate().key, clock=lambda: now[0])
    issuer = NodeTokenIssuer(ring)
    old = issuer.mint_node_token("n1", now=T0)
    ring.rotate(datetime.timedelta(minutes=5))
    new = issuer.mint_node_token("n1", now=T0)
    auth = issuer.authenticator(leeway=datetime.timedelta(days=3650))  # only the keys matter here
    assert auth.authenticate(md(old)) == NodeAgent("n1")
    assert auth.authenticate(md(new)) == NodeAgent("n1")
    now[0] = T0 + datetime.timedelta(minutes=5)
    with pytest.raises(AuthenticationError, match="rotated out"):
        auth.authenticate(md(old))
    assert auth.authenticate(md(new)) == NodeAgent("n1")
    assert ring.status()["retiring"] == []


def test_the_ring_is_kept_across_restarts(tmp_path: Path) -> None:
    key_file = tmp_path / "node-token-key.pem"
    first = NodeTokenIssuer.load_or_create(key_file)
    old = first.mint_node_token("n1")
    first.rotate_key(datetime.timedelta(hours=1))
    assert (tmp_path / "node-token-key.retiring.json").stat().st_mode & 0o777 == 0o600
    again = NodeTokenIssuer.load_or_create(key_file)
    assert again.ring.current_kid == first.ring.current_kid
    assert again.authenticator().authenticate(md(old)) == NodeAgent("n1")
    again.rotate_key(datetime.timedelta(0))  # the previous key retires at once; the first one still overlaps
    third = NodeTokenIssuer.load_or_create(key_file)
    assert [r.kid for r in third.ring.retiring()] == [jwt.get_unverified_header(old)["kid"]]


def test_a_caller_carries_its_tokens_expiry() -> None:
    issuer = NodeTokenIssuer.generate()
    token = issuer.mint_node_token("n1")
    caller = issuer.authenticator().authenticate(md(token))
    assert caller.expires == jwt.decode(token, options={"verify_signature": False})["exp"]
