"""Item 7: what the client wrote is not what the waypoint vouches for.

- `x-forwarded-client-cert` is sanitized and set from the verified peer (`By=<waypoint>;URI=<peer>`, as
  Envoy's `forward_client_cert_details: SANITIZE_SET`), `x-forwarded-for` gets the verified source
  address appended, a client's `forwarded` header is removed.
- JWT: when no key of the issuer's set carries the token's `kid`, the keys without a `kid` are tried (as
  Envoy does), so Istio's own sample token verifies against its key written without one; and the rule
  fields that were accepted but ignored work: `outputClaimToHeaders`, `outputPayloadToHeader`,
  `fromCookies` (`timeout` is in test_jwks.py).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.security.waypoint_helpers import (
    GATEWAY,
    backend_json,
    l7,
    request,
    reviews_table,
    run,
    running_proxy,
    start_backend,
)
from waypoint.l7.jwt import authenticate, compile_rules
from waypoint.l7.model import RequestHead

FIXTURES = Path(__file__).parent / "fixtures"
DEMO_TOKEN = (FIXTURES / "istio-demo.jwt").read_text().strip()
DEMO_JWKS = json.loads((FIXTURES / "istio-demo-jwks.json").read_text())
DEMO_ISSUER = "testing@secure.istio.io"
WAYPOINT = "spiffe://cluster.local/ns/bookinfo/sa/waypoint"
PEER = "spiffe://cluster.local/ns/bookinfo/sa/sleep"  # what the harness's front verified

SPOOFED = (("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/bookinfo/sa/waypoint;"
                                       "URI=spiffe://cluster.local/ns/istio-system/sa/admin"),
           ("x-forwarded-for", "10.9.9.9"), ("forwarded", "for=10.9.9.9;proto=https"))


def test_client_forwarding_headers_are_sanitized_and_set() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            async with running_proxy(reviews_table(backend.port)) as (_, front, _log, _n):
                head, body = await request(front.port, "/", headers=SPOOFED)
                seen = backend_json(body)["headers"]
                assert head.status == 200
                assert seen["x-forwarded-client-cert"] == f"URI={PEER}"  # the waypoint's identity unknown here
                assert seen["x-forwarded-for"] == "10.9.9.9,127.0.0.1"
                assert "forwarded" not in seen
                head, body = await request(front.port, "/")
                seen = backend_json(body)["headers"]
                assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-client-cert"] == f"URI={PEER}"
            n.cancel_scope.cancel()
    run(main)


def test_xfcc_names_the_waypoint_and_the_verified_peer() -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            async with running_proxy(reviews_table(backend.port), identity=WAYPOINT) as (_, front, _log, _n):
                _, body = await request(front.port, "/", headers=SPOOFED)
                assert backend_json(body)["headers"]["x-forwarded-client-cert"] == f"By={WAYPOINT};URI={PEER}"
            n.cancel_scope.cancel()
    run(main)


def _rules(jwks: dict[str, Any], **extra: Any) -> Any:
    spec = {"jwtRules": [{"issuer": DEMO_ISSUER, "jwks": json.dumps(jwks), **extra}]}
    return compile_rules("RequestAuthentication bookinfo/jwt", "bookinfo", "jwt", spec, ())


def _bearer(token: str) -> RequestHead:
    return RequestHead("GET", "/", "reviews", (("authorization", f"Bearer {token}"),))


def test_jwt_tries_keys_without_kid_when_no_key_carries_the_tokens_kid() -> None:
    # Istio's sample token, as published, verifies.
    assert authenticate(_rules(DEMO_JWKS), _bearer(DEMO_TOKEN), lambda u: None).ok
    # The same key written without a kid (as many issuers publish it): Envoy tries it, so must we.
    no_kid = {"keys": [{k: v for k, v in DEMO_JWKS["keys"][0].items() if k != "kid"}]}
    result = authenticate(_rules(no_kid), _bearer(DEMO_TOKEN), lambda u: None)
    assert result.ok, result.reason
    assert result.principal == f"{DEMO_ISSUER}/{DEMO_ISSUER}"
    # A key with another kid is not tried; the kid-less one after it is.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    decoy = {**json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(other.public_key())), "kid": "other"}
    assert authenticate(_rules({"keys": [decoy, no_kid["keys"][0]]}), _bearer(DEMO_TOKEN), lambda u: None).ok
    # A token without kid is checked against every key, not only the first.
    plain = pyjwt.encode({"iss": DEMO_ISSUER, "sub": "alice", "exp": int(time.time()) + 60}, other, algorithm="RS256")
    assert authenticate(_rules({"keys": [no_kid["keys"][0], decoy]}), _bearer(plain), lambda u: None).ok
    # No key at all for that kid: refused, saying so.
    refused = authenticate(_rules({"keys": [decoy]}), _bearer(DEMO_TOKEN), lambda u: None)
    assert not refused.ok and "kid" in refused.reason


def test_jwt_output_claims_and_payload_to_headers() -> None:
    ra = l7("RequestAuthentication", "jwt", {"targetRefs": GATEWAY, "jwtRules": [{
        "issuer": DEMO_ISSUER, "jwks": json.dumps(DEMO_JWKS), "outputPayloadToHeader": "x-jwt-payload",
        "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}, {"header": "x-jwt-foo", "claim": "foo"},
                                 {"header": "x-jwt-exp", "claim": "exp"}, {"header": "x-jwt-none", "claim": "nope"}]}]})
    forged = (("x-jwt-sub", "admin"), ("x-jwt-payload", "e30"), ("x-jwt-none", "forged"))

    async def main() -> None:
        async with trio.open_nursery() as n:
            backend = await start_backend(n, "v1")
            async with running_proxy(reviews_table(backend.port, ra)) as (_, front, _log, _n):
                head, body = await request(front.port, "/", headers=(("authorization", f"Bearer {DEMO_TOKEN}"), *forged))
                seen = backend_json(body)["headers"]
                assert head.status == 200
                assert (seen["x-jwt-sub"], seen["x-jwt-foo"], seen["x-jwt-exp"]) == (DEMO_ISSUER, "bar", "4685989700")
                assert "x-jwt-none" not in seen
                payload = seen["x-jwt-payload"]
                assert "=" not in payload
                assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["foo"] == "bar"
                # Without a token the client's own values of those headers never reach the service.
                _, body = await request(front.port, "/", headers=forged)
                seen = backend_json(body)["headers"]
                assert not {"x-jwt-sub", "x-jwt-payload", "x-jwt-none"} & set(seen), seen
            n.cancel_scope.cancel()
    run(main)


def test_jwt_from_cookies() -> None:
    rules = _rules(DEMO_JWKS, fromCookies=["session"])
    head = RequestHead("GET", "/", "reviews", (("cookie", "theme=dark"), ("cookie", f"a=b; session={DEMO_TOKEN}; c=d")))
    result = authenticate(rules, head, lambda u: None)
    assert result.ok and result.principal == f"{DEMO_ISSUER}/{DEMO_ISSUER}"
    # Only the locations the rule names are read: the default Authorization header is not one of them.
    head = RequestHead("GET", "/", "reviews", (("authorization", "Bearer not-a-token"),))
    result = authenticate(rules, head, lambda u: None)
    assert result.ok and result.principal == ""
    bad = RequestHead("GET", "/", "reviews", (("cookie", "session=not.a.token"),))
    assert not authenticate(rules, bad, lambda u: None).ok
