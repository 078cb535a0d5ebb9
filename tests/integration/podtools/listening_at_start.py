"""A pod's command that first says which TCP ports already listen in its network namespace (the node agent's,
if the pod was enrolled before it started), then answers every HTTP GET with 200: `python
listening_at_start.py PORT`.  Standard library only."""

import http.server
import json
import sys


def listening() -> list[int]:
    """The ports in LISTEN state (st 0A) in this namespace's /proc/net/tcp."""
    ports = set()
    with open("/proc/self/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    print(json.dumps({"listening_at_start": listening()}), flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Ok).serve_forever()
