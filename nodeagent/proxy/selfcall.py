"""What makes a connection a call to the node agent itself, which the agent refuses rather than dials.

ztunnel refuses such connections as a `SelfCall`: carried out, each would make the agent connect to one
of its own listeners, which takes it as a new connection and connects again, without end, until the
agent has no descriptors left (for every pod of its node).  A connection is one when it is addressed to

- loopback (or 0.0.0.0): the capture never redirects loopback, so it reached an agent listener directly;
- the very address it arrived at: it was not redirected at all (`curl <pod IP>:15001` from the pod);
- one of the agent's own ports (`mesh.defaults.AGENT_PORTS`) of this pod, or of the mesh workload an
  HBONE tunnel would ask the destination's agent to connect to.

Pure: the routing and admission decisions call it before any I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Collection

from mesh import defaults

AGENT_PORTS = frozenset(defaults.AGENT_PORTS)


@functools.lru_cache(maxsize=4096)
def is_loopback(ip: str) -> bool:
    """(Cached: every connection asks, about a few addresses.)"""
    try:
        address = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def agent_port(port: int) -> str | None:
    """Why `port` may not be connected to on a pod of the mesh, or None."""
    if port in AGENT_PORTS:
        return f"port {port} is one of the node agent's own ports, not an application's"
    return None


def self_call(ip: str, port: int, *, own_ips: Collection[str] = (),
              arrived_at: tuple[str, int] | None = None) -> str | None:
    """Why a connection going to `ip:port` would reach the agent itself (its refusal reason), or None.
    `own_ips`: the pod's own addresses; `arrived_at`: the local address of the agent's accepted socket."""
    if is_loopback(ip):
        return f"{ip}:{port} is loopback: the connection reached the node agent's listener directly"
    if arrived_at is not None and (ip, port) == (str(arrived_at[0]), int(arrived_at[1])):
        return f"{ip}:{port} is the node agent's own listener: the connection was not redirected to it"
    if ip in own_ips:
        return agent_port(port)
    return None
