"""L7 authorization and JWT authentication, decided without sockets."""

from __future__ import annotations

import json
import time

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from waypoint_resources import WAYPOINT, bookinfo, fq, l7

from waypoint.config import compile_table
from waypoint.l7 import authz
from waypoint.l7.authz import AuthzRequest, CompiledPolicy, compile_policy
from waypoint.l7.jwt import authenticate, compile_rules
from waypoint.l7.model import RequestHead

PRODUCTPAGE = fq("productpage")
SLEEP = "cluster.local/ns/bookinfo/sa/sleep"


def policy(spec: dict, hostnames: tuple[str, ...] = (PRODUCTPAGE,), name: str = "p") -> CompiledPolicy:
    p, _ = compile_policy("AuthorizationPolicy bookinfo/" + name, name, "bookinfo", spec, hostnames)
    return p


def req(method: str = "GET", path: str = "/productpage", **kw: object) -> AuthzRequest:
    base: dict = {"host": "productpage:9080", "port": 9080, "principal": SLEEP, "namespace": "bookinfo"}
    base.update(kw)
    return AuthzRequest(method=method, path=path, **base)


VIEWER = {"targetRefs": [{"kind": "Service", "group": "", "name": "productpage"}], "action": "ALLOW",
          "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}


def test_productpage_viewer_allows_get_denies_others() -> None:
    p = [policy(VIEWER)]
    assert authz.decide(p, PRODUCTPAGE, req("GET")).allowed
    for method in ("POST", "DELETE", "PUT"):
        d = authz.decide(p, PRODUCTPAGE, req(method))
        assert not d.allowed and d.reason == "no ALLOW policy matched"
    # other services are not covered by a Service-targeted policy
    assert authz.decide(p, fq("reviews"), req("POST")).allowed


def test_deny_wins_over_allow_and_audit_changes_nothing() -> None:
    ps = [policy(VIEWER), policy({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}, name="d"),
          policy({"action": "AUDIT", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, name="a")]
    d = authz.decide(ps, PRODUCTPAGE, req("GET", "/admin/x"))
    assert not d.allowed and d.policy == "bookinfo/d" and d.audited == ("bookinfo/a",)
    assert authz.decide(ps, PRODUCTPAGE, req("GET", "/productpage")).allowed


def test_empty_allow_policy_denies_everything_and_empty_rule_allows() -> None:
    assert not authz.decide([policy({})], PRODUCTPAGE, req()).allowed
    assert authz.decide([policy({"rules": [{}]})], PRODUCTPAGE, req()).allowed


def test_sources_principals_namespaces_and_not_values() -> None:
    spec = {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/*"],
                                            "notNamespaces": ["legacy"]}}],
                       "to": [{"operation": {"hosts": ["productpage*"], "ports": ["9080"], "notPaths": ["/private"]}}]}]}
    p = [policy(spec)]
    assert authz.decide(p, PRODUCTPAGE, req()).allowed
    assert not authz.decide(p, PRODUCTPAGE, req(path="/private")).allowed
    assert not authz.decide(p, PRODUCTPAGE, req(principal="cluster.local/ns/legacy/sa/sleep", namespace="legacy")).allowed
    assert not authz.decide(p, PRODUCTPAGE, req(principal="")).allowed


def test_request_principals_and_when_conditions() -> None:
    spec = {"rules": [{"from": [{"source": {"requestPrincipals": ["testing@secure.istio.io/*"]}}],
                       "when": [{"key": "request.auth.claims[groups]", "values": ["group1"]},
                                {"key": "request.headers[x-tenant]", "notValues": ["blocked"]},
                                {"key": "source.ip", "values": ["10.244.0.0/16"]}]}]}
    p = [policy(spec)]
    good = req(request_principal="testing@secure.istio.io/sub", claims={"groups": ["group1", "group2"]},
               source_ip="10.244.1.10", headers=(("x-tenant", "a"),))
    assert authz.decide(p, PRODUCTPAGE, good).allowed
    assert not authz.decide(p, PRODUCTPAGE, req()).allowed  # no token: no request principal
    assert not authz.decide(p, PRODUCTPAGE, AuthzRequest(**{**good.__dict__, "headers": (("x-tenant", "blocked"),)})).allowed
    assert not authz.decide(p, PRODUCTPAGE, AuthzRequest(**{**good.__dict__, "claims": {"groups": ["other"]}})).allowed
    assert not authz.decide(p, PRODUCTPAGE, AuthzRequest(**{**good.__dict__, "source_ip": "192.168.0.1"})).allowed


def test_custom_is_refused_with_a_warning_and_denies_what_it_covers() -> None:
    spec = {"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}]}
    p, warnings = compile_policy("AuthorizationPolicy bookinfo/ext", "ext", "bookinfo", spec, ())
    assert warnings and "CUSTOM" in warnings[0] and "not supported" in warnings[0]
    assert not authz.decide([p], PRODUCTPAGE, req(path="/headers")).allowed
    assert authz.decide([p], PRODUCTPAGE, req(path="/other")).allowed


def test_compile_table_reports_bad_resources_and_keeps_the_rest() -> None:
    workloads, services = bookinfo()
    good = l7("AuthorizationPolicy", "viewer", VIEWER, [PRODUCTPAGE])
    bad = l7("VirtualService", "broken", {"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "reviews"}, "weight": 30}, {"destination": {"host": "reviews"}, "weight": 30}]}]},
             [fq("reviews")])
    unknown = l7("DestinationRule", "typo", {"host": "reviews", "trafficPolcy": {}}, [fq("reviews")])
    other_waypoint = l7("VirtualService", "elsewhere", {"hosts": ["x"], "http": [{"route": []}]}, waypoints=["other/wp"])
    custom = l7("AuthorizationPolicy", "ext", {"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]})
    result = compile_table(WAYPOINT, workloads, services, [good, bad, unknown, other_waypoint, custom])
    messages = sorted(str(e) for e in result.errors)
    assert len(messages) == 2
    assert "VirtualService bookinfo/broken" in messages[1] and "sum to 60" in messages[1]
    assert "trafficPolcy" in messages[0] and "trafficPolicy" in messages[0]
    assert [p.name for p in result.table.policies] == ["ext", "viewer"]
    assert any("CUSTOM" in w for w in result.warnings)


# ---- JWT --------------------------------------------------------------------------------------------

ISSUER = "testing@secure.istio.io"


@pytest.fixture(scope="module")
def keys() -> tuple[rsa.RSAPrivateKey, dict]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    return key, {"keys": [jwk]}


def token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    body: dict = {"iss": ISSUER, "sub": ISSUER, "exp": int(time.time()) + 600, "groups": ["group1"]}
    body.update(claims)
    return pyjwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def rules(jwks: dict, **extra: object) -> tuple:
    spec = {"jwtRules": [{"issuer": ISSUER, "jwks": json.dumps(jwks), **extra}]}
    return compile_rules("RequestAuthentication bookinfo/jwt", "bookinfo", "jwt", spec, ())


def get(path: str = "/", **headers: str) -> RequestHead:
    return RequestHead("GET", path, "productpage", tuple(headers.items()))


def test_valid_token_gives_a_request_principal_and_is_stripped(keys: tuple) -> None:
    key, jwks = keys
    r = authenticate(rules(jwks), get(authorization=f"Bearer {token(key)}"), lambda u: None)
    assert r.ok and r.principal == f"{ISSUER}/{ISSUER}" and r.claims["groups"] == ["group1"]
    assert r.strip_header == "authorization"
    r = authenticate(rules(jwks, forwardOriginalToken=True), get(authorization=f"Bearer {token(key)}"), lambda u: None)
    assert r.ok and r.strip_header == ""


def test_invalid_tokens_are_refused(keys: tuple) -> None:
    key, jwks = keys
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "garbage": "Bearer not.a.jwt",
        "bad signature": f"Bearer {token(other)}",
        "expired": f"Bearer {token(key, exp=int(time.time()) - 60)}",
        "other issuer": f"Bearer {pyjwt.encode({'iss': 'evil', 'sub': 'x'}, key, algorithm='RS256', headers={'kid': 'k1'})}",
    }
    for name, value in cases.items():
        r = authenticate(rules(jwks), get(authorization=value), lambda u: None)
        assert not r.ok, name
        assert r.reason
    r = authenticate(rules(jwks, audiences=["bookinfo.com"]), get(authorization=f"Bearer {token(key, aud='other')}"), lambda u: None)
    assert not r.ok
    r = authenticate(rules(jwks, audiences=["bookinfo.com"]), get(authorization=f"Bearer {token(key, aud='bookinfo.com')}"), lambda u: None)
    assert r.ok and r.audiences == ("bookinfo.com",)


def test_missing_token_is_allowed_unauthenticated(keys: tuple) -> None:
    _, jwks = keys
    r = authenticate(rules(jwks), get(), lambda u: None)
    assert r.ok and r.principal == ""


def test_token_from_query_parameter_and_custom_header(keys: tuple) -> None:
    key, jwks = keys
    t = token(key)
    assert authenticate(rules(jwks), get(f"/?access_token={t}"), lambda u: None).principal
    custom = rules(jwks, fromHeaders=[{"name": "x-jwt-assertion"}])
    r = authenticate(custom, get(**{"x-jwt-assertion": t}), lambda u: None)
    assert r.ok and r.strip_header == "x-jwt-assertion"
    assert authenticate(custom, get(authorization=f"Bearer {t}"), lambda u: None).principal == ""


def test_jwks_uri_uses_the_lookup(keys: tuple) -> None:
    key, jwks = keys
    spec = {"jwtRules": [{"issuer": ISSUER, "jwksUri": "http://keys.example/jwks.json"}]}
    rs = compile_rules("ra", "bookinfo", "jwt", spec, ())
    h = get(authorization=f"Bearer {token(key)}")
    assert not authenticate(rs, h, lambda u: None).ok
    keyset = pyjwt.PyJWKSet.from_dict(jwks)  # what the JWKS cache hands over
    assert authenticate(rs, h, lambda u: keyset if u == "http://keys.example/jwks.json" else None).ok
