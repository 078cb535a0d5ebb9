"""The waypoint's data-path listeners, alone or shared by its worker processes (`waypoint.workers`).

Shared, every worker's listener on a port is made with SO_REUSEPORT (`mesh.reuseport.share`) before it
binds, so the workers of one waypoint (same user, same network namespace) form one group on the port and
the kernel spreads new connections over them.  Alone, it is trio's listener, as it has always been.
"""

from __future__ import annotations

import socket

import trio

from mesh import reuseport

BACKLOG = 4096  # capped by net.core.somaxconn, as trio's own listeners are


async def open_listeners(port: int, host: str, *, shared: bool = False) -> list[trio.SocketListener]:
    """Listening sockets on host:port (every address `host` resolves to); `shared`: in a SO_REUSEPORT group."""
    if not shared:
        return await trio.open_tcp_listeners(port, host=host)
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in await trio.socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reuseport.share(sock)  # type: ignore[arg-type]  # trio's socket has setsockopt as socket's
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
