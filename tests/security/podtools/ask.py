"""A TCP client for tests: `python ask.py HOST PORT`.  Prints the first line the server sends (a
whoami server: the peer it saw), "closed" if the connection ended without one, or "error: ..."."""

import socket
import sys

try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(data.decode().strip() or "closed")
except OSError as exc:
    print(f"error: {exc}")
