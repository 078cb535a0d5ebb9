"""The redirector seam: what enrollment asks of a capture mechanism, for one pod at a time.

A redirector makes a pod's TCP reach the agent's listeners inside the pod (outbound to 15001, inbound
plaintext to 15006, HBONE on 15008 untouched), and tells the agent where a captured outbound connection
was going.  Enrollment calls `install` only once the pod's listeners are open, and `remove` before they
close; capture outlives the agent (pods fail closed while it restarts) and the next agent adopts it.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from nodeagent.pods.source import PodRef


class Outcome(enum.Enum):
    INSTALLED = "installed"
    ADOPTED = "adopted"  # found exactly our capture, left by an earlier run of the agent
    REDONE = "redone"  # found a partial or different capture: removed it and installed ours


@dataclass(frozen=True)
class Capture:
    """What a redirector finds in one pod."""

    mode: str
    present: bool  # any of our capture is there
    exact: bool  # exactly our capture, adoptable
    detail: tuple[str, ...] = ()  # rules or programs, for `meshctl agent redirect`


class Redirector(Protocol):
    mode: str  # "iptables" or "ebpf"

    def install(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> Outcome:
        """Capture the pod's traffic into `listeners` (port -> the agent's listening socket in the pod);
        adopt exact leftovers, replace anything else."""
        ...

    def adopt(self, pod: PodRef, listeners: Mapping[int, socket.socket]) -> bool:
        """Take over exactly-ours capture an earlier agent left in the pod (pointing it at `listeners`);
        whether there was such capture to adopt."""
        ...

    def remove(self, pod: PodRef) -> bool:
        """Remove all of our capture from the pod; whether there was anything to remove."""
        ...

    def verify(self, pod: PodRef) -> Capture:
        """What of our capture the pod has now."""
        ...

    def original_destination(self, sock: socket.socket) -> tuple[str, int]:
        """Where a connection accepted on the pod's outbound listener was going."""
        ...
