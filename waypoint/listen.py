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
    socks = await trio.to_thread.run_sync(lambda: listening_sockets(port, host, shared=True))
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in socks]


def listening_sockets(port: int, host: str, *, shared: bool = False) -> list[socket.socket]:
    """Listening sockets on host:port (every address `host` resolves to), for a loop other than trio's;
    `shared`: in a SO_REUSEPORT group.  Port 0 picks one free port for all of them."""
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if socks and port == 0:  # the same port on every address
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if shared:
                    reuseport.share(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
