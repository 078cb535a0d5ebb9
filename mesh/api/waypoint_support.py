"""What a waypoint can enforce: the checks beyond types and ranges, made once for both sides.

The schema (`mesh.api.kinds_networking`, `mesh.api.kinds_security`) calls these checks, so the control
plane refuses at apply what a waypoint would refuse to compile, and the waypoint, which checks every
L7 spec again with the same schema before compiling it (`waypoint.config`), refuses it for the same
reason in the same words.  A document the control plane accepts therefore compiles at the waypoint, and
one bad resource can never be part of a response the waypoint has to refuse
(`tests/security/test_nack_isolation.py` fuzzes this).

- JWT rules: `jwks` must hold at least one key the waypoint can use (`parse_jwks`, the one parser of
  inline key sets), and a rule needs `jwks` or `jwksUri` (waypoints do not discover keys from the issuer).
- HTTP routes: no `delegate`; fault delays are `fixedDelay`, aborts `httpStatus` or `grpcStatus` (a
  gRPC status name, such as `UNAVAILABLE`, as Istio requires).
- Load balancing: `simple` only (no `consistentHash`), and not `PASSTHROUGH`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mesh.api.errors import FieldError
from mesh.api.schema import Errors, child

if TYPE_CHECKING:
    import jwt

NOT_SUPPORTED = "is not supported by waypoints"

# gRPC status codes by name (grpc/doc/statuscodes.md): the names `fault.abort.grpcStatus` accepts
GRPC_STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def parse_jwks(text: str) -> jwt.PyJWKSet:
    """The key set of an inline `jwks`; ValueError saying what is wrong if it has no key a waypoint can use."""
    import jwt  # here, not at the top: PyJWT loads `cryptography`, which a waypoint without JWT rules never needs
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('is not a JSON Web Key Set ({"keys": [...]})')
    try:
        return jwt.PyJWKSet.from_dict(data)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"has no usable key ({exc})") from None


def check_jwt_rule(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("jwks") and value.get("jwksUri"):
        errors.append(FieldError(path, "set only one of jwks, jwksUri"))
    elif value.get("jwks"):
        try:
            parse_jwks(value["jwks"])
        except ValueError as exc:
            errors.append(FieldError(child(path, "jwks"), str(exc)))
    elif not value.get("jwksUri"):
        errors.append(FieldError(path, "set jwks or jwksUri: waypoints do not discover keys from the issuer"))


def check_http_route(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("delegate") is not None:
        errors.append(FieldError(child(path, "delegate"), f"{NOT_SUPPORTED}: route here, or to a destination"))
    fault = value.get("fault") or {}
    delay, abort = fault.get("delay") or {}, fault.get("abort") or {}
    if delay.get("exponentialDelay") is not None:
        errors.append(FieldError(child(child(child(path, "fault"), "delay"), "exponentialDelay"),
                                 f"{NOT_SUPPORTED}: use fixedDelay"))
    if abort.get("http2Error") is not None:
        errors.append(FieldError(child(child(child(path, "fault"), "abort"), "http2Error"),
                                 f"{NOT_SUPPORTED}: use httpStatus or grpcStatus"))
    grpc_status = abort.get("grpcStatus")
    if grpc_status is not None and grpc_status not in GRPC_STATUS_CODES:
        errors.append(FieldError(child(child(child(path, "fault"), "abort"), "grpcStatus"),
                                 f"{grpc_status!r} is not a gRPC status name (one of {', '.join(GRPC_STATUS_CODES)})"))


def check_load_balancer(value: dict[str, Any], path: str, errors: Errors) -> None:
    if value.get("consistentHash") is not None:
        errors.append(FieldError(child(path, "consistentHash"),
                                 f"{NOT_SUPPORTED}: use simple (ROUND_ROBIN, LEAST_REQUEST or RANDOM)"))
    if value.get("simple") == "PASSTHROUGH":
        errors.append(FieldError(child(path, "simple"), f"PASSTHROUGH {NOT_SUPPORTED}"))
