"""Sockets the node agent makes inside a pod's network namespace.

A socket belongs to the network namespace its creating thread was in when `socket()` ran, for good:
create it inside the pod (via `mesh.netns.entered`), then use it from anywhere.  Every socket the agent
makes in a pod carries SO_MARK 0x539 so the pod's redirect rules let it through.
"""

from __future__ import annotations

import socket

from mesh import netns
from nodeagent.redirect.rules import AGENT_MARK

LISTEN_BACKLOG = 1024


def listener_in(netns_path: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket inside the pod's namespace, bound to host:port."""
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def connecting_socket_in(netns_path: str) -> socket.socket:
    """An unconnected TCP socket inside the pod's namespace, marked so the pod's rules skip it."""
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock
