"""The bookinfo sample application: one program, four services, chosen by the `SERVICE` variable.

    productpage  GET /productpage   calls details and reviews, answers both nested in its own answer
    details      GET /details/<id>  the book's details
    reviews      GET /reviews/<id>  v1: reviews only; v2 (black stars) and v3 (red stars) also call ratings
    ratings      GET /ratings/<id>  the ratings

Every answer is JSON and says which service, version, pod and node served it.  The headers that tie a
request together (`end-user`, `x-request-id`, and the trace context: W3C `traceparent`/`tracestate`, and
Zipkin's B3 set `x-b3-*` and single `b3`) are passed on to every call made for it, as Istio asks of an
application so that the proxies' spans join into one trace.  HTTP/1.1 with keep-alive on both sides; standard library only, so it runs with any Python 3.
Settings come from the environment: SERVICE, VERSION, PORT (9080), POD_NAME, NODE_NAME, and
DOWNSTREAM_TIMEOUT (seconds, default 3).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

SERVICE = os.environ.get("SERVICE", "productpage")
VERSION = os.environ.get("VERSION", "v1")
PORT = int(os.environ.get("PORT", "9080"))
POD = os.environ.get("POD_NAME", os.uname().nodename)
NODE = os.environ.get("NODE_NAME", "")
TIMEOUT = float(os.environ.get("DOWNSTREAM_TIMEOUT", "3"))
PROPAGATED = ("end-user", "x-request-id", "traceparent", "tracestate", "baggage", "x-b3-traceid",
              "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3", "user-agent", "cookie")

_local = threading.local()


def identity() -> dict[str, Any]:
    return {"service": SERVICE, "version": VERSION, "pod": POD, "node": NODE}


def call(host: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET http://host:9080/path over a kept-alive connection of this thread; errors become values."""
    conns: dict[str, http.client.HTTPConnection] = _local.__dict__.setdefault("conns", {})
    for attempt in (1, 2):
        conn = conns.get(host)
        if conn is None:
            conn = conns[host] = http.client.HTTPConnection(host, 9080, timeout=TIMEOUT)
        try:
            if conn.sock is None:
                conn.connect()
                sock = cast(socket.socket, conn.sock)  # set by connect()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the server: no held writes
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            del conns[host]
            # A kept-alive connection the server closed meanwhile: retry once on a fresh one.
            if attempt == 1 and isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError,
                                                 ConnectionResetError)):
                continue
            return {"error": f"{host}: {exc.__class__.__name__}: {exc}"}
        if resp.status != 200:
            return {"error": f"{host} answered {resp.status}", "status": resp.status,
                    "body": body[:200].decode(errors="replace")}
        try:
            answer: dict[str, Any] = json.loads(body)
        except ValueError:
            return {"error": f"{host} answered something that is not JSON"}
        return answer
    return {"error": f"{host}: no answer"}


def productpage(book: str, headers: dict[str, str]) -> dict[str, Any]:
    return {**identity(), "book": book, "details": call("details", f"/details/{book}", headers),
            "reviews": call("reviews", f"/reviews/{book}", headers)}


def details(book: str, headers: dict[str, str]) -> dict[str, Any]:
    return {**identity(), "id": book, "author": "William Shakespeare", "year": 1595, "type": "paperback",
            "pages": 200, "publisher": "PublisherA", "language": "English"}


def reviews(book: str, headers: dict[str, str]) -> dict[str, Any]:
    answer: dict[str, Any] = {**identity(), "id": book, "reviews": [
        {"reviewer": "Reviewer1", "text": "An extremely entertaining play by Shakespeare."},
        {"reviewer": "Reviewer2", "text": "Absolutely fun and entertaining."},
    ]}
    if VERSION in ("v2", "v3"):
        answer["color"] = "black" if VERSION == "v2" else "red"
        answer["ratings"] = call("ratings", f"/ratings/{book}", headers)
    return answer


def ratings(book: str, headers: dict[str, str]) -> dict[str, Any]:
    return {**identity(), "id": book, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


ROUTES = {
    "productpage": (re.compile(r"^/productpage/?(?:\?.*)?$"), productpage),
    "details": (re.compile(r"^/details/([^/?]+)"), details),
    "reviews": (re.compile(r"^/reviews/([^/?]+)"), reviews),
    "ratings": (re.compile(r"^/ratings/([^/?]+)"), ratings),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"bookinfo-{SERVICE}/{VERSION}"
    # One write per answer, sent at once.  Unbuffered (the stdlib's default), the headers and the body
    # leave in two small writes; on a kept-alive connection Nagle's algorithm holds the second until the
    # first is ACKed, and the client delays that ACK (~40 ms): every request would take ~45 ms, mesh or not.
    wbufsize = 64 * 1024  # headers and body gather here; the server flushes once the request is handled
    disable_nagle_algorithm = True  # TCP_NODELAY: that one write is not held back either

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path in ("/health", "/healthz"):
            self.reply(200, {**identity(), "status": "ok"})
            return
        pattern, handler = ROUTES[SERVICE]
        match = pattern.match(self.path)
        if match is None:
            self.reply(404, {**identity(), "error": f"no route for {self.path}"})
            return
        headers = {k: v for k in PROPAGATED if (v := self.headers.get(k)) is not None}
        headers.setdefault("x-request-id", str(uuid.uuid4()))
        book = match.group(1) if match.groups() else "0"
        self.reply(200, handler(book, headers), headers)

    def reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if headers and "x-request-id" in headers:
            self.send_header("x-request-id", headers["x-request-id"])
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        sys.stdout.write(f"{self.address_string()} {format % args}\n")


def main() -> None:
    if SERVICE not in ROUTES:
        sys.exit(f"bookinfo: SERVICE must be one of {', '.join(ROUTES)}, not {SERVICE!r}")
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    print(f"bookinfo {SERVICE} {VERSION} ({POD} on {NODE}) listening on :{PORT}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
