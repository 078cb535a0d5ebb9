"""Load balancing over a cluster's endpoints: ROUND_ROBIN, LEAST_REQUEST, RANDOM.

`Balancer.pick` chooses among the endpoints that are healthy and not ejected by outlier detection; when
every endpoint is unavailable it answers None (the proxy replies 503 with flag UH).  LEAST_REQUEST
compares two endpoints drawn at random and takes the one with fewer requests in flight (the "power of
two choices", as Envoy does); with two endpoints that is simply the less loaded one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from waypoint.l7.model import Endpoint


class Balancer:
    """Per-cluster balancing state: a round-robin cursor and requests in flight per endpoint."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._cursor = 0
        self.active: dict[str, int] = {}

    def pick(self, policy: str, endpoints: Sequence[Endpoint],
             available: Callable[[Endpoint], bool] = lambda e: True,
             exclude: frozenset[str] = frozenset()) -> Endpoint | None:
        """An endpoint, preferring ones not in `exclude` (those tried already by this request)."""
        usable = [e for e in endpoints if e.healthy and available(e)]
        fresh = [e for e in usable if e.key not in exclude]
        candidates = fresh or usable
        if not candidates:
            return None
        if policy == "ROUND_ROBIN":
            chosen = candidates[self._cursor % len(candidates)]
            self._cursor += 1
            return chosen
        if policy == "RANDOM":
            return self._rng.choice(candidates)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if self.active.get(a.key, 0) <= self.active.get(b.key, 0) else b

    def started(self, endpoint: Endpoint) -> None:
        self.active[endpoint.key] = self.active.get(endpoint.key, 0) + 1

    def finished(self, endpoint: Endpoint) -> None:
        n = self.active.get(endpoint.key, 0) - 1
        if n > 0:
            self.active[endpoint.key] = n
        else:
            self.active.pop(endpoint.key, None)
