"""A thread that follows the store: the one loop behind the Kubernetes status writers and the Secret watches.

`StoreFollower.work()` runs on a thread of its own once at `start()`, again after every change of the
store that `wants` (a subscriber of the store is called under the store's lock, so it only raises a
flag), and every `every` seconds if set (for what the store does not hold, such as a Service's load
balancer address).  `work()` returns True when something failed; the follower then runs it again after
`retry` seconds, if set (else at the next change or look).  An exception from `work()` is logged and
counts as a failure: a follower keeps following.  `stop()` ends the subscription and the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from controlplane.config.source import ChangeEvent
from controlplane.config.store import Store

log = logging.getLogger(__name__)


def every_change(_event: ChangeEvent) -> bool:
    return True


class StoreFollower:
    def __init__(self, store: Store, name: str, *, what: str, every: float | None = None,
                 retry: float | None = None, wants: Callable[[ChangeEvent], bool] = every_change) -> None:
        self._store = store
        self._name = name  # the thread's
        self._what = what  # for the log: "cannot <what>"
        self._every = every
        self._retry = retry
        self._wants = wants
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def work(self) -> bool:
        """One pass; True if something failed (overridden)."""
        raise NotImplementedError

    def start(self) -> None:
        self._unsubscribe = self._store.subscribe(self._changed)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._dirty.set()

    def stop(self, timeout: float = 5.0) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stopping.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _changed(self, event: ChangeEvent) -> None:
        if self._wants(event):
            self._dirty.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._dirty.wait(self._every)
            if self._stopping.is_set():
                return
            self._dirty.clear()
            try:
                failed = self.work()
            except Exception:  # keep following: the next change (or retry, or look) tries again
                log.exception("kubernetes: cannot %s", self._what)
                failed = True
            if failed and self._retry is not None and self._stopping.wait(self._retry) is False:
                self._dirty.set()
