"""Giving memory back: what the agent's C allocator keeps after a load has gone.

glibc's malloc holds every buffer, TLS object and socket structure of the data path (and CPython's
objects over 512 bytes).  After a load drops, the freed heap stays in the process until something asks
for it back: `malloc_trim(0)` returns the free pages of every arena to the kernel.  Two things may hold
it first: objects left in reference cycles, which by then sit in the collector's oldest generation and
wait for a full collection that may not come for a long time (a finished relay leaves none since it
lets go of its ends, `Splice._let_go`; a closed tunnel used to leave ~25); and the pooled HBONE
connections the load opened (their TLS and HTTP/2 state), which stay until the pool's idle timeout.
So the trimmer looks at the agent's open connections, the pods' and the pool's, on a timer, and when
their number has fallen a lot since the last trim (`TrimPolicy`, pure) it runs a full collection, then
`malloc_trim(0)`, at most once a minute.  An agent that carries a steady
load never pays for either (a full collection holds the interpreter, and so the data path, for ~0.15 s
in an agent that has carried 5,000 tunnels).

It changes nothing the agent does; it is a no-op where the C library is not glibc.  (Fewer malloc
arenas, `mallopt(M_ARENA_MAX, 2)`, was measured too and made no difference: not kept.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("nodeagent.memory")

TRIM_INTERVAL = 10.0  # seconds between looks at the open connections (`--memory-trim-interval`)
TRIM_MIN_DROP = 32  # connections that must have closed since the last trim ...
TRIM_DROP_FRACTION = 0.5  # ... and at least this share of the most open since then
TRIM_SPACING = 60.0  # seconds at least between two trims (a full collection holds the interpreter ~0.15 s)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc: its own allocator, its own policy
        return None
    return libc


def trim() -> bool:
    """Return every arena's free pages to the kernel; whether any memory was released."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def resident_kib() -> int:
    """This process's VmRSS, in KiB (0 where /proc does not say)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class TrimPolicy:
    """When to trim, from the number of open connections seen at each look (at `now`, in seconds): once it
    has fallen by at least `min_drop` and by `drop_fraction` of the most seen since the last trim, and
    `spacing` seconds have passed since that trim."""

    min_drop: int = TRIM_MIN_DROP
    drop_fraction: float = TRIM_DROP_FRACTION
    spacing: float = TRIM_SPACING
    peak: int = 0
    last_trim: float | None = None

    def look(self, open_connections: int, now: float) -> bool:
        self.peak = max(self.peak, open_connections)
        drop = self.peak - open_connections
        if self.last_trim is not None and now - self.last_trim < self.spacing:
            return False
        if drop >= self.min_drop and drop >= self.drop_fraction * self.peak:
            self.peak, self.last_trim = open_connections, now
            return True
        return False


class Trimmer:
    """Every `interval` seconds: the open connections (`count`, from the data path), and a trim in a
    worker thread when the policy says the load has dropped."""

    def __init__(self, count: Callable[[], Awaitable[int]], interval: float = TRIM_INTERVAL,
                 policy: TrimPolicy | None = None) -> None:
        self.count = count
        self.interval = interval
        self.policy = policy or TrimPolicy()
        self.trims = 0

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            try:
                await self.look()
            except Exception as exc:  # an optimisation: the agent goes on without it
                log.warning("looking whether to give memory back failed: %s", exc)

    async def look(self) -> bool:
        """One look; whether it trimmed."""
        open_now = await self.count()
        if not self.policy.look(open_now, trio.current_time()):
            return False
        before, started = resident_kib(), time.perf_counter()
        collected = gc.collect()  # the load's cyclic garbage, long promoted to the oldest generation
        collecting = time.perf_counter() - started
        await trio.to_thread.run_sync(trim)  # ctypes lets go of the GIL: the data path goes on meanwhile
        self.trims += 1
        log.info('{"event": "memory_trimmed", "open_connections": %d, "rss_kib_before": %d, "rss_kib_after": %d, '
                 '"collected": %d, "collect_ms": %.1f}', open_now, before, resident_kib(), collected, 1000 * collecting)
        return True
