"""Retry decisions (pure): whether an attempt's outcome may be retried under a route's `retryOn`, and
the backoff before the next attempt.

`retryOn` words as Istio (Envoy) defines them: `5xx` (a 5xx answer, or no answer: connect failure, reset,
refused stream, per-try timeout), `gateway-error` (502, 503, 504, and no answer), `connect-failure`,
`reset`, `refused-stream`, `retriable-4xx` (409), and bare status codes such as `503`; for gRPC, `cancelled`,
`deadline-exceeded`, `internal`, `resource-exhausted` and `unavailable`, read from the `grpc-status` of a
trailers-only answer (`waypoint.l7.grpc`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from waypoint.errors import ConnectFailure, RefusedStream, UpstreamError, UpstreamReset
from waypoint.l7 import grpc

BACKOFF_BASE = 0.025
BACKOFF_MAX = 0.25


@dataclass(frozen=True)
class Outcome:
    """What one attempt produced: a status, or a failure kind (`connect-failure`, `reset`,
    `refused-stream`, `timeout`)."""

    status: int = 0
    failure: str = ""
    grpc_status: int | None = None  # of a trailers-only gRPC answer

    @property
    def outlier_status(self) -> int:
        """The status outlier detection counts (failures count as 503, timeouts as 504, a gRPC status as
        the HTTP status gRPC maps it to)."""
        if self.failure == "timeout":
            return 504
        if self.failure:
            return 503
        return grpc.grpc_to_http(self.grpc_status) if self.grpc_status is not None else self.status


def outcome_of(error: UpstreamError) -> Outcome:
    if isinstance(error, ConnectFailure):
        return Outcome(failure="connect-failure")
    if isinstance(error, RefusedStream):
        return Outcome(failure="refused-stream")
    if isinstance(error, UpstreamReset):
        return Outcome(failure="reset")
    return Outcome(failure="connect-failure")


def retriable(outcome: Outcome, retry_on: frozenset[str]) -> bool:
    if outcome.failure:
        if retry_on & {"5xx", "gateway-error"}:
            return True
        return outcome.failure in retry_on
    if outcome.grpc_status is not None and any(grpc.RETRY_ON.get(w) == outcome.grpc_status for w in retry_on):
        return True
    s = outcome.status
    if str(s) in retry_on:
        return True
    if s >= 500 and "5xx" in retry_on:
        return True
    if s in (502, 503, 504) and "gateway-error" in retry_on:
        return True
    return s == 409 and "retriable-4xx" in retry_on


def backoff(attempt: int, rng: random.Random) -> float:
    """Jittered exponential backoff before retry number `attempt` (1-based), as Envoy does (25 ms base)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** (attempt - 1)))
    return rng.uniform(0, ceiling)
