"""A tiny authoritative DNS server for tests: `python dns_server.py PORT NAME=IP ...` (UDP and TCP).

A queries for a listed name get its address; any other name gets NXDOMAIN; other types get an empty
NOERROR for listed names.  Each query is printed (name and protocol), so a test can see what reached
it.  Standard library only: it runs inside pods, outside the mesh.
"""

import socket
import struct
import sys
import threading

PORT = int(sys.argv[1])
RECORDS = dict(arg.split("=", 1) for arg in sys.argv[2:])


def answer(query: bytes) -> bytes:
    qid, flags = struct.unpack_from("!HH", query)
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1:pos + 1 + query[pos]].decode().lower())
        pos += 1 + query[pos]
    pos += 1
    qtype = struct.unpack_from("!H", query, pos)[0]
    question = query[12:pos + 4]
    name = ".".join(labels)
    ip = RECORDS.get(name)
    rcode = 0 if ip else 3
    records = b""
    if ip and qtype == 1:
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(ip)
    print(f"query {name} type {qtype}", flush=True)
    head = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode, 1,
                       1 if records else 0, 0, 0)
    return head + question + records


def serve_udp() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            reply = answer(data)
        except (IndexError, struct.error):
            continue  # not a query it can read: no answer
        sock.sendto(reply, peer)


def serve_tcp_client(conn: socket.socket) -> None:
    with conn:
        while (head := conn.recv(2)) and len(head) == 2:
            n = struct.unpack("!H", head)[0]
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    return
                data += chunk
            reply = answer(data)
            conn.sendall(struct.pack("!H", len(reply)) + reply)


def serve_tcp() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", PORT))
    sock.listen(16)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_tcp_client, args=(conn,), daemon=True).start()


threading.Thread(target=serve_tcp, daemon=True).start()
print(f"dns listening on :{PORT}", flush=True)
serve_udp()
