"""When to renew a certificate, and how long to wait after a failed attempt.  No I/O, no clock:
callers pass `now` (seconds, any monotonic-with-wall-time base) and a `random.Random`.

A certificate is renewed at half its lifetime.  A failed request is retried after a jittered
exponential backoff (1 s, 2 s, 4 s, ... capped at 150 s), never later than the certificate's expiry
allows, so a transient CA outage shorter than half the lifetime goes unnoticed by the data plane.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RenewalPolicy:
    renew_fraction: float = 0.5
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 150.0
    jitter: float = 0.2  # each delay is scaled by a factor in [1 - jitter, 1 + jitter], then capped
    # When the trust bundle's signing root changes, certificates of another root are renewed within this many
    # seconds (spread at random, so that a node's agents do not all ask the CA at the same instant).
    bundle_renew_jitter: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        if self.initial_backoff <= 0 or self.multiplier < 1 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoff must start positive, grow, and be capped above its start")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.bundle_renew_jitter < 0:
            raise ValueError("bundle_renew_jitter cannot be negative")

    def renew_at(self, not_before: float, not_after: float) -> float:
        """When a certificate valid from `not_before` to `not_after` should be renewed."""
        return not_before + (not_after - not_before) * self.renew_fraction

    def backoff(self, failures: int, rng: random.Random) -> float:
        """The delay before retry number `failures` (1 for the first retry)."""
        if failures < 1:
            raise ValueError("backoff is for a retry: failures must be at least 1")
        base = self.initial_backoff * self.multiplier ** min(failures - 1, 64)
        jittered = base * rng.uniform(1 - self.jitter, 1 + self.jitter)
        return min(jittered, self.max_backoff)


class RenewalState(enum.Enum):
    NEEDED = "needed"  # no certificate yet: ask now
    VALID = "valid"  # holding a certificate; renew at `due`
    RETRYING = "retrying"  # the last attempt failed; try again at `due`


@dataclass
class RenewalSchedule:
    """The renewal state machine of one identity.

    NEEDED --issued--> VALID --(due)--> attempt --issued--> VALID
                                            \\--failed--> RETRYING --(due)--> attempt ...
    """

    policy: RenewalPolicy = field(default_factory=RenewalPolicy)
    rng: random.Random = field(default_factory=random.Random)
    state: RenewalState = RenewalState.NEEDED
    due: float = 0.0
    failures: int = 0
    not_after: float | None = None

    def issued(self, not_before: float, not_after: float) -> float:
        """A certificate was obtained; returns when to renew it."""
        self.state = RenewalState.VALID
        self.failures = 0
        self.not_after = not_after
        self.due = self.policy.renew_at(not_before, not_after)
        return self.due

    def failed(self, now: float) -> float:
        """An attempt failed at `now`; returns when to try again."""
        self.state = RenewalState.RETRYING
        self.failures += 1
        self.due = now + self.policy.backoff(self.failures, self.rng)
        return self.due

    def renew_by(self, when: float) -> None:
        """Renew no later than `when` (a new root signs: the certificate should be from it)."""
        self.due = min(self.due, when)

    def delay(self, now: float) -> float:
        """Seconds from `now` until the next attempt (0 if it is due)."""
        return max(0.0, self.due - now)

    def expired(self, now: float) -> bool:
        return self.not_after is not None and now >= self.not_after
