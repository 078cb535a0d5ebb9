"""Outlier detection: eject endpoints that keep failing, bring them back later (pure; time injected).

Per cluster, as Istio's `outlierDetection` describes it:
- an endpoint is ejected after `consecutive5xxErrors` 5xx answers in a row (connection failures and
  resets count as 503, a timed-out attempt as 504, whether its per-try or the route's timeout ended it,
  and a gRPC status as the HTTP status gRPC maps it to, as in Envoy unless local-origin errors are split
  out), or after `consecutiveGatewayErrors` 502/503/504 in a row when that is set;
- it stays out for `baseEjectionTime` x the number of times it has been ejected; each `interval` that
  passes with the endpoint in and healthy lowers that multiplier by one;
- at most `maxEjectionPercent` of the endpoints are out at once, but at least one may always be ejected
  (as Envoy does, so that 10% of three endpoints still ejects one).
"""

from __future__ import annotations

from dataclasses import dataclass

from waypoint.l7.rules import OutlierPolicy


@dataclass
class _Host:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    last_decay: float = 0.0


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self._hosts: dict[str, _Host] = {}

    def _host(self, key: str, now: float) -> _Host:
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host(last_decay=now)
        return h

    def _refresh(self, h: _Host, now: float) -> None:
        if h.ejected_until is not None and now >= h.ejected_until:
            h.ejected_until = None
            h.last_decay = now
        if h.ejected_until is None and h.ejections and self.policy.interval > 0:
            steps = int((now - h.last_decay) // self.policy.interval)
            if steps > 0:
                h.ejections = max(0, h.ejections - steps)
                h.last_decay += steps * self.policy.interval

    def is_ejected(self, key: str, now: float) -> bool:
        h = self._hosts.get(key)
        if h is None:
            return False
        self._refresh(h, now)
        return h.ejected_until is not None

    def ejected_count(self, now: float) -> int:
        return sum(1 for k in list(self._hosts) if self.is_ejected(k, now))

    def record(self, key: str, status: int, now: float, total_hosts: int) -> bool:
        """Record one outcome (`status` 5xx for errors; 503 for a connect failure or reset).
        True when this outcome ejected the endpoint."""
        h = self._host(key, now)
        self._refresh(h, now)
        if status >= 500:
            h.consecutive_5xx += 1
            h.consecutive_gateway = h.consecutive_gateway + 1 if status in (502, 503, 504) else 0
        else:
            h.consecutive_5xx = h.consecutive_gateway = 0
            return False
        p = self.policy
        tripped = (p.consecutive_5xx > 0 and h.consecutive_5xx >= p.consecutive_5xx) or \
                  (p.consecutive_gateway > 0 and h.consecutive_gateway >= p.consecutive_gateway)
        if not tripped or h.ejected_until is not None:
            return False
        ejected = self.ejected_count(now)
        if ejected > 0 and (ejected + 1) * 100 > p.max_ejection_percent * max(total_hosts, 1):
            return False
        if p.max_ejection_percent == 0:
            return False
        h.ejections += 1
        h.ejected_until = now + p.base_ejection_time * h.ejections
        h.consecutive_5xx = h.consecutive_gateway = 0
        return True
