"""connectionPool limits per cluster: requests in flight, requests waiting, retries in flight.

A request needs a slot: while fewer than `min(tcp.maxConnections, http.http2MaxRequests)` requests are in
flight it proceeds; otherwise it waits in a FIFO queue of at most `http.http1MaxPendingRequests`; beyond
that it overflows (the proxy answers 503 with flag UO, as Envoy's circuit breaker does).  `maxRetries`
bounds the retries in flight across the cluster.  Each HTTP/1.1 request to an endpoint holds one
connection, so the connection limit is also a limit on concurrent requests.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Protocol

import trio

from waypoint.l7.rules import PoolLimits


class Admission(enum.Enum):
    PROCEED = "proceed"
    QUEUE = "queue"
    OVERFLOW = "overflow"


class Waiter(Protocol):
    """A request waiting in the queue: `set()` hands it a slot (a `trio.Event`, or the engine's waiter)."""

    def set(self) -> None: ...


class ClusterLimiter:
    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.active = 0
        self.retries = 0
        self._waiting: deque[Waiter] = deque()

    @property
    def capacity(self) -> int:
        return min(self.limits.max_connections, self.limits.max_requests)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def admit(self) -> Admission:
        """The decision for one new request, without waiting (the sans-IO step)."""
        if self.active < self.capacity and not self._waiting:
            return Admission.PROCEED
        if self.pending < self.limits.max_pending:
            return Admission.QUEUE
        return Admission.OVERFLOW

    async def acquire(self) -> bool:
        """Take a slot, waiting in the queue if needed; False on overflow."""
        decision = self.admit()
        if decision is Admission.OVERFLOW:
            return False
        if decision is Admission.PROCEED:
            self.active += 1
            return True
        event = trio.Event()
        self._waiting.append(event)
        try:
            await event.wait()
        except BaseException:
            if event in self._waiting:
                self._waiting.remove(event)
            elif event.is_set():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            raise
        return True

    def enqueue(self, waiter: Waiter) -> None:
        """Wait in the queue without a task (after `admit` said QUEUE): `release` sets `waiter` when the slot
        is its, and the slot is then held as `acquire` holds it."""
        self._waiting.append(waiter)

    def withdraw(self, waiter: Waiter) -> None:
        """`waiter` no longer waits (its request is gone)."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)

    def release(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # hand the slot over: `active` stays the same
        else:
            self.active = max(0, self.active - 1)

    def try_retry(self) -> bool:
        if self.retries >= self.limits.max_retries:
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries = max(0, self.retries - 1)
