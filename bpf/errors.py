"""The errors of the eBPF redirect library, one hierarchy under `BpfError`.

Every message says what is wrong and, where it can, what to do.  `EbpfUnavailable` is the one a
caller turns into "use iptables instead": this machine cannot run the programs at all.
"""

from __future__ import annotations

import os

IPTABLES_HINT = "start the node agent with --redirect-mode iptables to capture traffic with iptables instead"


class BpfError(Exception):
    """An error of the eBPF redirect library; `str()` is the whole message."""


class EbpfUnavailable(BpfError):
    """The kernel, its mounts or bcc cannot do eBPF redirection on this machine."""

    def __init__(self, missing: str) -> None:
        super().__init__(f"eBPF redirection is unavailable: {missing}; {IPTABLES_HINT}")
        self.missing = missing


class BpfCallError(BpfError):
    """A bpf(2) operation failed; `errno` says why."""

    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"{what}: {os.strerror(errno)}")
        self.what = what
        self.errno = errno


class PodTargetError(BpfError):
    """What a pod's programs were to be attached to (its cgroup, its network namespace, the agent's
    listener) is missing or not of the right kind.  Nothing was attached."""


class AttachError(BpfError):
    """The kernel refused part of a pod's attachment.  Nothing of the new attachment is left behind."""


class NoOriginalDestination(BpfError):
    """An accepted outbound connection has no record of where it was going."""
