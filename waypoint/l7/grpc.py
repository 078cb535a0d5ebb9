"""gRPC as Envoy treats it for Istio's routes (pure): what a gRPC request is, its status codes, its
timeout header, and how a local reply is written for it.

- A request is gRPC when its `content-type` is `application/grpc` or `application/grpc+<codec>` (not
  gRPC-Web).
- A local reply to a gRPC request (route timeout, fault abort, no healthy upstream, denied, ...) is a
  trailers-only response: HTTP 200, `content-type: application/grpc`, `grpc-status` from the HTTP status
  (`http_to_grpc`, gRPC's own mapping) unless the reply names one, and `grpc-message` = the reply's text.
  So a route timeout reaches a gRPC client as UNAVAILABLE "upstream request timeout", as from Envoy
  (checked against Envoy 1.40: Envoy does not answer DEADLINE_EXCEEDED there).
- Istio sets `max_grpc_timeout` to the route's timeout (0 = none), so a gRPC request's timeout is its
  `grpc-timeout` header capped by the route's timeout, and the route's timeout when the header is absent
  or invalid.  (Envoy also rewrites the `grpc-timeout` the endpoint sees to the time left; not done here:
  the endpoint gets the client's.)
- Retry and outlier detection read `grpc-status` from a trailers-only answer; outlier detection counts
  it as the HTTP status gRPC maps it to (`grpc_to_http`: UNAVAILABLE is 503, DEADLINE_EXCEEDED 504).
"""

from __future__ import annotations

from mesh.api.waypoint_support import GRPC_STATUS_CODES
from waypoint.l7.model import Headers, RequestHead, header

OK = 0
UNKNOWN = GRPC_STATUS_CODES["UNKNOWN"]

# retryOn words for gRPC statuses (Envoy's x-envoy-retry-grpc-on)
RETRY_ON = {"cancelled": GRPC_STATUS_CODES["CANCELLED"], "deadline-exceeded": GRPC_STATUS_CODES["DEADLINE_EXCEEDED"],
            "internal": GRPC_STATUS_CODES["INTERNAL"], "resource-exhausted": GRPC_STATUS_CODES["RESOURCE_EXHAUSTED"],
            "unavailable": GRPC_STATUS_CODES["UNAVAILABLE"]}

_HTTP_TO_GRPC = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                 429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}
_GRPC_TO_HTTP = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
                 "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                 "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
                 "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
_BY_CODE = {code: name for name, code in GRPC_STATUS_CODES.items()}
_UNITS = {"H": 3600, "M": 60, "S": 1}  # grpc-timeout units that multiply seconds
_FRACTIONS = {"m": 1_000, "u": 1_000_000, "n": 1_000_000_000}  # and those that divide them


def is_grpc(head: RequestHead) -> bool:
    return head.grpc


def http_to_grpc(status: int) -> int:
    return GRPC_STATUS_CODES[_HTTP_TO_GRPC.get(status, "UNKNOWN")]


def grpc_to_http(code: int) -> int:
    return _GRPC_TO_HTTP.get(_BY_CODE.get(code, "UNKNOWN"), 500)


def status_of(headers: Headers) -> int | None:
    """The `grpc-status` in `headers` (None when absent or not a number)."""
    value = header(headers, "grpc-status")
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def parse_timeout(value: str | None) -> float | None:
    """`grpc-timeout` (1 to 8 digits and a unit: H M S m u n) in seconds; None when absent or malformed."""
    if not value:
        return None
    value = value.strip()
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8:
        return None
    if unit in _UNITS:
        return float(int(digits) * _UNITS[unit])
    if unit in _FRACTIONS:
        return int(digits) / _FRACTIONS[unit]
    return None


def request_timeout(route_timeout: float | None, head: RequestHead) -> float | None:
    """The timeout of one request: the route's, or for gRPC its `grpc-timeout` capped by the route's."""
    if not is_grpc(head):
        return route_timeout
    asked = parse_timeout(head.header("grpc-timeout"))
    if not asked:
        return route_timeout
    return min(asked, route_timeout) if route_timeout else asked


def _percent_encode(text: str) -> str:
    out = []
    for b in text.encode("utf-8"):
        out.append(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}")
    return "".join(out)


def local_reply_headers(status: int, message: str, grpc_status: int | None = None) -> Headers:
    """The headers of a trailers-only answer to a gRPC request (sent with :status 200 and END_STREAM)."""
    code = grpc_status if grpc_status is not None else http_to_grpc(status)
    out: Headers = (("content-type", "application/grpc"), ("grpc-status", str(code)))
    if message:
        out = (*out, ("grpc-message", _percent_encode(message)))
    return out
