"""Sockets the node agent makes inside a pod's network namespace.

A socket belongs to the network namespace its creating thread was in when `socket()` ran, for good:
create it inside the pod (via `mesh.netns.entered`), then use it from anywhere.  Every socket the agent
makes in a pod carries SO_MARK 0x539 so the pod's redirect rules let it through.

`SocketSupply` makes the agent's connecting sockets ahead of use, a batch per namespace at a time, so a
new connection costs no `setns` pair (it did, twice, per connection); `transparent_socket_in` and
`connecting_socket_in` make one at once.

`transparent_socket_in` is the one the destination agent connects to the application with: bound to
the client's address (IP_TRANSPARENT), so that the application sees who connected; the pod's policy
routing (`redirect.rules.policy_routing`) brings the application's replies to that address back to this
socket.  In iptables mode those replies are found by their connmark, so the port is the kernel's choice,
made at connect() with the whole 4-tuple known (port 0 and IP_BIND_ADDRESS_NO_PORT, as ztunnel does):
one client address can then hold as many connections to one application port as the pod's ephemeral
range has ports, and no choice is ever retried.  eBPF mode routes the replies by the port, so there it
is one of `TRANSPARENT_PORTS`, chosen here (`source_port()`).

`listener_in` makes the pod's listeners so that the agent's successor can share their ports while the
two overlap (`mesh.reuseport`): a restart or an upgrade refuses no connection.  They belong to
`LISTENER_UID`, so no other user's socket (the application's, even as root) can join their ports.
"""

from __future__ import annotations

import errno
import logging
import random
import socket

from mesh import netns, reuseport
from mesh.defaults import LISTENER_UID
from nodeagent.redirect.rules import AGENT_MARK, TRANSPARENT_PORTS

log = logging.getLogger("nodeagent.sockets")

IP_FREEBIND = 15
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24  # bind(ip, 0) leaves the port to connect(), which knows the 4-tuple
BUSY = (errno.EADDRINUSE, errno.EADDRNOTAVAIL)  # a source port taken for that address (or 4-tuple)

LISTEN_BACKLOG = 1024


def listener_in(netns_path: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket inside the pod's namespace, bound to host:port, sharing the port with the
    listener of an agent that runs alongside (the one before or after this one) and taking the new
    connections from it (`reuseport.prefer_newest`)."""
    with netns.entered(netns_path):
        sock = _listening_socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuseport.share(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        reuseport.prefer_newest(sock)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def migrate_queued_connections(netns_path: str) -> None:
    """Connections queued on a listener of the pod that closes (the old agent's, as it drains) go to the
    successor's listener of that port rather than being reset.  Best effort: where /proc/sys is read-only
    (a container), the successor taking every new connection first (`prefer_newest`) leaves the old
    listeners' queues empty anyway, but for connections arriving in the instant they close."""
    try:
        reuseport.migrate_requests(netns_path)
    except OSError as exc:
        _warn_once("migrate", f"cannot set {reuseport.MIGRATE_SYSCTL}=1 in pods ({exc}): a connection queued on "
                              "a pod listener at the very moment an old agent closes it is reset")


def _listening_socket() -> socket.socket:
    try:
        with reuseport.owned_by(LISTENER_UID):
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except reuseport.ReuseportError as exc:
        _warn_once("owner", f"{exc}: the pods' listeners belong to the agent's own user, so a pod's application "
                            "running as that user could share their ports (add CAP_SETUID)")
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


_warned: set[str] = set()


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s", message)


def connecting_socket_in(netns_path: str) -> socket.socket:
    """An unconnected TCP socket inside the pod's namespace, marked so the pod's rules skip it."""
    with netns.entered(netns_path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def transparent_socket_in(netns_path: str, source_ip: str, port: int) -> socket.socket:
    """An unconnected, marked TCP socket inside the pod's namespace, bound to `source_ip`: an address
    that is not the pod's (the client's).  `port` 0: the kernel picks the port at connect() (iptables
    mode).  Otherwise a port of `TRANSPARENT_PORTS` (`source_port()`, eBPF mode): the kernel cannot pick
    these itself (a socket's own port range is clamped to the ephemeral range), so the caller does, and
    tries another if connect() finds that 4-tuple taken (`BUSY`)."""
    sock = connecting_socket_in(netns_path)
    try:
        make_transparent(sock, source_ip, port)
    except BaseException:
        sock.close()
        raise
    return sock


def source_port() -> int:
    low, high = TRANSPARENT_PORTS
    return random.randint(low, high)


SUPPLY_BATCH = 16  # sockets made per namespace switch


class SocketSupply:
    """Unconnected, marked, non-blocking TCP sockets made inside pods' network namespaces, a batch at
    a time (one namespace switch per batch).  Used from one thread (the engine's); `forget` a
    namespace when its pod leaves (its sockets are closed)."""

    def __init__(self, batch: int = SUPPLY_BATCH) -> None:
        self._batch = batch
        self._stock: dict[str, list[socket.socket]] = {}
        self.made = 0  # sockets made since start (how many switches: made / batch)

    def take(self, netns_path: str) -> socket.socket:
        stock = self._stock.get(netns_path)
        if not stock:
            stock = self._stock[netns_path] = self._make(netns_path)
        return stock.pop()

    def forget(self, netns_path: str) -> None:
        for sock in self._stock.pop(netns_path, ()):
            sock.close()

    def close(self) -> None:
        for path in list(self._stock):
            self.forget(path)

    def _make(self, netns_path: str) -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            with netns.entered(netns_path):
                for _ in range(self._batch):
                    made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for sock in made:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        self.made += len(made)
        return made


def make_transparent(sock: socket.socket, source_ip: str, port: int) -> None:
    """Bind a supplied socket to the client's address, and to `port` or (0) to the port connect() picks
    (see `transparent_socket_in`)."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    if port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # one port, many destinations
    else:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source_ip, port))
