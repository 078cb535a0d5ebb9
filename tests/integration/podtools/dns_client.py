"""What a pod's application does with names, for tests.  Standard library only; prints one JSON line.
Several steps in one run: their arguments separated by `+`, a JSON list of their results printed.

    python dns_client.py getaddrinfo NAME          the addresses the system resolver gives (IPv4)
    python dns_client.py query udp|tcp NAME [TYPE] a raw query to the resolv.conf nameserver, port 53:
                                                   {"rcode": n, "answers": [ip, ...]}
    python dns_client.py connect NAME PORT         connect by name, send a line, print the echo
    python dns_client.py garbage udp|tcp           bytes that are no query to the nameserver: {"reply": hex}
"""

import json
import random
import socket
import struct
import sys


def nameserver() -> str:
    with open("/etc/resolv.conf") as f:
        return next(line.split()[1] for line in f if line.startswith("nameserver"))


def query(protocol: str, name: str, qtype: int) -> dict:
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)
    message = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    server = (nameserver(), 53)
    if protocol == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        sock.sendto(message, server)
        data, peer = sock.recvfrom(4096)
    else:
        sock = socket.create_connection(server, timeout=5)
        sock.sendall(struct.pack("!H", len(message)) + message)
        n = struct.unpack("!H", sock.recv(2))[0]
        data = b""
        while len(data) < n:
            data += sock.recv(n - len(data))
        peer = server
    rid, flags, _, ancount = struct.unpack_from("!HHHH", data)
    pos = 12 + len(question)
    answers = []
    for _ in range(ancount):
        pos += 2 if data[pos] & 0xC0 else len(data)  # our servers compress the owner name
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if rtype == 1:
            answers.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += rdlen
    return {"id_matches": rid == qid, "rcode": flags & 0xF, "answers": answers, "from": f"{peer[0]}:{peer[1]}"}


def garbage(protocol: str) -> str:
    junk = b"\x42\x42\x01\x00\x00\x07" + b"\xff" * 9  # id 0x4242, seven questions, then nonsense
    if protocol == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        sock.sendto(junk, (nameserver(), 53))
        return sock.recv(4096).hex()
    with socket.create_connection((nameserver(), 53), timeout=5) as conn:
        conn.sendall(struct.pack("!H", len(junk)) + junk)
        head = conn.recv(2)
        return conn.recv(struct.unpack("!H", head)[0]).hex() if len(head) == 2 else ""


def step(argv: list[str]) -> dict:
    verb = argv[0]
    if verb == "getaddrinfo":
        try:
            found = socket.getaddrinfo(argv[1], None, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return {"error": str(exc)}
        return {"addresses": sorted({a[4][0] for a in found})}
    if verb == "garbage":
        return {"reply": garbage(argv[1])}
    if verb == "query":
        return query(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else 1)
    try:
        with socket.create_connection((argv[1], int(argv[2])), timeout=5) as sock:
            sock.sendall(b"hello\n")
            return {"echo": sock.recv(100).decode()}
    except OSError as exc:  # refused or reset: what a denied connection looks like
        return {"error": str(exc)}


def main() -> None:
    steps: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "+":
            steps.append([])
        else:
            steps[-1].append(arg)
    print(json.dumps([step(s) for s in steps]))


main()
