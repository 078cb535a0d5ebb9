"""RequestAuthentication: find a request's JWT, check it against the configured issuers (pure).

As in Istio: the token is looked for in each rule's `fromHeaders` / `fromParams` (default: the
`Authorization: Bearer` header and the `access_token` query parameter); a request without any token is
let through unauthenticated (an AuthorizationPolicy that requires `requestPrincipals` then denies it); a
token that is present but invalid (bad signature, expired, wrong issuer or audience) is answered 401.  The
header carrying a valid token is removed before forwarding unless the rule sets `forwardOriginalToken`.

Key sets come from `jwks` (inline) or `jwksUri`; the I/O layer (`waypoint.jwks`) fetches the latter and
passes a lookup in, so this module never does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt as pyjwt

from waypoint.errors import ConfigError
from waypoint.l7.model import RequestHead

DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"
_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]

JwksLookup = Callable[[str], pyjwt.PyJWKSet | None]


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: pyjwt.PyJWKSet | None = None  # parsed once, when the rule is compiled
    jwks_uri: str = ""
    headers: tuple[tuple[str, str], ...] = (DEFAULT_HEADER,)
    params: tuple[str, ...] = (DEFAULT_PARAM,)
    forward_original_token: bool = False
    policy: str = ""
    hostnames: tuple[str, ...] = ()

    def applies_to(self, hostname: str) -> bool:
        return not self.hostnames or hostname in self.hostnames


@dataclass(frozen=True)
class AuthnResult:
    """`ok` False means answer 401 with `reason`.  `principal` is "" for an unauthenticated request."""

    ok: bool
    principal: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    strip_header: str = ""  # header to remove before forwarding
    reason: str = ""


def compile_rules(where: str, namespace: str, name: str, spec: Mapping[str, Any],
                  hostnames: Sequence[str]) -> tuple[JwtRule, ...]:
    out = []
    for i, r in enumerate(spec.get("jwtRules") or ()):
        jwks = None
        if r.get("jwks"):
            try:
                jwks = pyjwt.PyJWKSet.from_dict(json.loads(r["jwks"]))
            except (ValueError, pyjwt.PyJWTError) as exc:
                raise ConfigError(where, f"spec.jwtRules[{i}].jwks: not a usable key set: {exc}") from exc
        elif not r.get("jwksUri"):
            raise ConfigError(where, f"spec.jwtRules[{i}]: set jwks or jwksUri (issuer discovery is not supported)")
        from_headers = tuple((h["name"].lower(), h.get("prefix", "")) for h in r.get("fromHeaders") or ())
        from_params = tuple(r.get("fromParams") or ())
        if not from_headers and not from_params:
            from_headers, from_params = (DEFAULT_HEADER,), (DEFAULT_PARAM,)
        out.append(JwtRule(r["issuer"], tuple(r.get("audiences") or ()), jwks, r.get("jwksUri") or "",
                           from_headers, from_params, bool(r.get("forwardOriginalToken")),
                           f"{namespace}/{name}", tuple(hostnames)))
    return tuple(out)


def _find_token(rule: JwtRule, head: RequestHead) -> tuple[str, str] | None:
    """(token, header it came from or "")."""
    for name, prefix in rule.headers:
        value = head.header(name)
        if value is None:
            continue
        if prefix and not value.lower().startswith(prefix.lower()):
            continue
        return value[len(prefix):].strip(), name
    if rule.params and head.query:
        params = dict(parse_qsl(head.query, keep_blank_values=True))
        for p in rule.params:
            if params.get(p):
                return params[p], ""
    return None


def _unverified_issuer(token: str) -> str | None:
    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None


def _key_for(keyset: pyjwt.PyJWKSet, token: str) -> Any:
    kid = pyjwt.get_unverified_header(token).get("kid")
    keys = [k for k in keyset.keys if kid is None or k.key_id == kid]
    if not keys:
        raise pyjwt.InvalidKeyError(f"no key with kid {kid!r} in the issuer's key set")
    return keys[0]


def authenticate(rules: Sequence[JwtRule], head: RequestHead, jwks_lookup: JwksLookup) -> AuthnResult:
    found: list[tuple[JwtRule, str, str]] = []
    for rule in rules:
        hit = _find_token(rule, head)
        if hit is not None:
            found.append((rule, *hit))
    if not found:
        return AuthnResult(True)
    token = found[0][1]
    issuer = _unverified_issuer(token)
    if issuer is None:
        return AuthnResult(False, reason="Jwt is not in the form of Header.Payload.Signature")
    matching = [(r, t, h) for r, t, h in found if r.issuer == issuer and t == token]
    if not matching:
        return AuthnResult(False, reason=f"Jwt issuer {issuer!r} is not configured")
    rule, token, where = matching[0]
    jwks = rule.jwks if rule.jwks is not None else jwks_lookup(rule.jwks_uri)
    if jwks is None:
        return AuthnResult(False, reason=f"Jwks for issuer {issuer!r} could not be fetched from {rule.jwks_uri}")
    try:
        key = _key_for(jwks, token)
        claims = pyjwt.decode(token, key, algorithms=_ALGORITHMS, issuer=rule.issuer,
                              audience=list(rule.audiences) or None,
                              options={"verify_aud": bool(rule.audiences)})
    except (pyjwt.PyJWTError, ValueError) as exc:
        return AuthnResult(False, reason=f"Jwt verification fails: {exc}")
    aud = claims.get("aud")
    audiences = tuple(aud) if isinstance(aud, list) else (aud,) if isinstance(aud, str) else ()
    return AuthnResult(True, principal=f"{claims.get('iss', '')}/{claims.get('sub', '')}", claims=claims,
                       audiences=audiences, presenter=str(claims.get("azp", "")),
                       strip_header="" if rule.forward_original_token else where)
