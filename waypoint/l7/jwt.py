"""RequestAuthentication: find a request's JWT, check it against the configured issuers (pure).

As in Istio: the token is looked for in each rule's `fromHeaders` / `fromParams` / `fromCookies`
(default, when a rule names none of them: the `Authorization: Bearer` header and the `access_token` query
parameter); a request without any token is let through unauthenticated (an AuthorizationPolicy that
requires `requestPrincipals` then denies it); a token that is present but invalid (bad signature,
expired, wrong issuer or audience) is answered 401.  The header carrying a valid token is removed before
forwarding unless the rule sets `forwardOriginalToken`.

Keys are chosen as Envoy's jwt_authn does: a key whose `kid` differs from the token's is skipped, every
other key (the same `kid`, or none) is tried until one verifies; a token without `kid` tries them all.

What a valid token tells is passed on as headers: `outputClaimToHeaders` (a string, integer or boolean
claim, nested ones written `a.b`) and `outputPayloadToHeader` (the payload, base64url as in the token).
Those header names are removed from every request the rule covers first, so a client cannot write them.

Key sets come from `jwks` (inline) or `jwksUri`; the I/O layer (`waypoint.jwks`) fetches the latter in the
background and passes a lookup in (and why a set is missing), so this module never does I/O or waits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from mesh.api.schema import parse_duration
from waypoint.errors import ConfigError
from waypoint.l7.model import Headers, RequestHead, header_values, with_header, without

if TYPE_CHECKING:
    import jwt as pyjwt

DEFAULT_HEADER = ("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"
DEFAULT_FETCH_TIMEOUT = 5.0  # Istio's default `timeout` of a JWT rule's JWKS fetch
_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]

JwksLookup = Callable[[str], "pyjwt.PyJWKSet | None"]
JwksUnavailable = Callable[[str], str]  # why a `jwksUri` has no keys


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
    cookies: tuple[str, ...] = ()
    claim_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    payload_header: str = ""
    timeout: float = DEFAULT_FETCH_TIMEOUT  # of each fetch of `jwks_uri`

    def applies_to(self, hostname: str) -> bool:
        return not self.hostnames or hostname in self.hostnames

    @property
    def output_headers(self) -> tuple[str, ...]:
        return tuple(h for h, _ in self.claim_headers) + ((self.payload_header,) if self.payload_header else ())


@dataclass(frozen=True)
class AuthnResult:
    """`ok` False means answer 401 with `reason`.  `principal` is "" for an unauthenticated request."""

    ok: bool
    principal: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    strip_header: str = ""  # header to remove before forwarding (the token's)
    reason: str = ""
    remove: tuple[str, ...] = ()  # headers only the waypoint may write (claims, payload)
    add: Headers = ()  # what it writes in them

    @property
    def changes_headers(self) -> bool:
        """Whether `apply` changes anything (most requests: no rule writes or strips a header)."""
        return bool(self.remove or self.strip_header or self.add)

    def apply(self, headers: Headers) -> Headers:
        """The request's headers as they go on: the token and client-written output headers removed,
        the verified ones set."""
        out = without(headers, [*self.remove, *([self.strip_header] if self.strip_header else [])])
        for name, value in self.add:
            out = with_header(out, name, value)
        return out


def compile_rules(where: str, namespace: str, name: str, spec: Mapping[str, Any],
                  hostnames: Sequence[str]) -> tuple[JwtRule, ...]:
    if not spec.get("jwtRules"):
        return ()
    # PyJWT (and the `cryptography` it loads, ~19 MiB) is imported with the first rule, not by every waypoint;
    # the functions below that a request calls import it again, a lookup in `sys.modules`
    import jwt as pyjwt

    out = []
    for i, r in enumerate(spec["jwtRules"]):
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
        from_cookies = tuple(r.get("fromCookies") or ())
        if not from_headers and not from_params and not from_cookies:
            from_headers, from_params = (DEFAULT_HEADER,), (DEFAULT_PARAM,)
        try:
            timeout = parse_duration(str(r["timeout"])) if r.get("timeout") else DEFAULT_FETCH_TIMEOUT
        except ValueError as exc:
            raise ConfigError(where, f"spec.jwtRules[{i}].timeout: {exc}") from exc
        out.append(JwtRule(r["issuer"], tuple(r.get("audiences") or ()), jwks, r.get("jwksUri") or "",
                           from_headers, from_params, bool(r.get("forwardOriginalToken")),
                           f"{namespace}/{name}", tuple(hostnames), from_cookies,
                           tuple((o["header"].lower(), o["claim"]) for o in r.get("outputClaimToHeaders") or ()),
                           (r.get("outputPayloadToHeader") or "").lower(), timeout))
    return tuple(out)


def _cookies(head: RequestHead) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in header_values(head.headers, "cookie"):
        for pair in value.split(";"):
            key, eq, val = pair.strip().partition("=")
            if eq and key not in out:
                out[key] = val.strip().strip('"')
    return out


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
    if rule.cookies:
        jar = _cookies(head)
        for c in rule.cookies:
            if jar.get(c):
                return jar[c], ""
    return None


def _unverified_issuer(token: str) -> str | None:
    import jwt as pyjwt

    try:
        claims = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None


def _candidate_keys(keyset: pyjwt.PyJWKSet, token: str) -> list[Any]:
    """The keys Envoy would try: all but those whose `kid` is set and differs from the token's."""
    import jwt as pyjwt

    kid = pyjwt.get_unverified_header(token).get("kid")
    keys = [k for k in keyset.keys if not kid or not k.key_id or k.key_id == kid]
    if not keys:
        raise pyjwt.InvalidKeyError(f"Jwks doesn't have key to match kid {kid!r} from Jwt")
    return keys


def _verify(rule: JwtRule, keyset: pyjwt.PyJWKSet, token: str) -> dict[str, Any]:
    import jwt as pyjwt

    last: Exception | None = None
    for key in _candidate_keys(keyset, token):
        try:
            return dict(pyjwt.decode(token, key, algorithms=_ALGORITHMS, issuer=rule.issuer,
                                     audience=list(rule.audiences) or None,
                                     options={"verify_aud": bool(rule.audiences)}))
        except pyjwt.InvalidSignatureError as exc:  # another candidate may verify it
            last = exc
        except (pyjwt.InvalidAlgorithmError, pyjwt.InvalidKeyError) as exc:  # a key of another kind
            last = exc
    assert last is not None
    raise last


def _claim_text(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim as a header value: strings, integers and booleans only (as Istio documents), nothing
    that could not be sent as one header line."""
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool):
        text = "true" if node else "false"
    elif isinstance(node, (str, int)):
        text = str(node)
    else:
        return None
    if any(ord(c) < 0x20 and c != "\t" or ord(c) == 0x7F or ord(c) > 0xFF for c in text):
        return None
    return text


def _outputs(rule: JwtRule, claims: Mapping[str, Any], token: str) -> Headers:
    out: list[tuple[str, str]] = []
    for header, claim in rule.claim_headers:
        text = _claim_text(claims, claim)
        if text is not None:
            out.append((header, text))
    if rule.payload_header:
        out.append((rule.payload_header, token.split(".")[1]))
    return tuple(out)


def authenticate(rules: Sequence[JwtRule], head: RequestHead, jwks_lookup: JwksLookup,
                 unavailable: JwksUnavailable | None = None) -> AuthnResult:
    remove = tuple(dict.fromkeys(h for r in rules for h in r.output_headers))
    found: list[tuple[JwtRule, str, str]] = []
    for rule in rules:
        hit = _find_token(rule, head)
        if hit is not None:
            found.append((rule, *hit))
    if not found:
        return AuthnResult(True, remove=remove)
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
        why = unavailable(rule.jwks_uri) if unavailable is not None else "not fetched"
        return AuthnResult(False, reason=f"Jwks for issuer {issuer!r} are not available from {rule.jwks_uri} "
                                         f"({why}): the token cannot be verified")
    import jwt as pyjwt

    try:
        claims = _verify(rule, jwks, token)
    except (pyjwt.PyJWTError, ValueError) as exc:
        return AuthnResult(False, reason=f"Jwt verification fails: {exc}")
    aud = claims.get("aud")
    audiences = tuple(aud) if isinstance(aud, list) else (aud,) if isinstance(aud, str) else ()
    return AuthnResult(True, principal=f"{claims.get('iss', '')}/{claims.get('sub', '')}", claims=claims,
                       audiences=audiences, presenter=str(claims.get("azp", "")),
                       strip_header="" if rule.forward_original_token else where,
                       remove=remove, add=_outputs(rule, claims, token))
