"""Reaching the trace collector: its OTLP/HTTP URL, TLS and the headers it wants, and one POST.

    collector = Collector.configure(url, ca_file=..., headers=...)   # checked: TracingError says what is wrong
    collector.post(body, timeout)                                    # blocking; ExportError when not taken

Endpoint: the OTLP/HTTP traces URL, `http[s]://HOST[:PORT][/PATH]` (a URL without a path gets
`/v1/traces`; the port defaults to 4318, OTLP/HTTP's, for both schemes).  Plain http suits a collector
in the cluster or a local agent, as Istio's OpenTelemetry provider talks to it; https is for a collector
elsewhere (a vendor's): its certificate is checked against the system's trust store, or only against the
CA file given (`--otlp-ca`, else `$OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`, else
`$OTEL_EXPORTER_OTLP_CERTIFICATE`, as OpenTelemetry's exporters read them), and its host name against the
certificate's names.  TLS 1.2 or later.  A certificate that does not verify is a failed export like any
other (counted, logged with the reason), never a crash.

Headers: what the collector wants besides the body (an `authorization` or API key header), from
`$OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `$OTEL_EXPORTER_OTLP_HEADERS`, in OpenTelemetry's format:
`name=value` pairs separated by commas, values percent-encoded (`authorization=Bearer%20abc`).  They
are sent as given, over http as well (a tenant header for an in-cluster collector); a credential wants an
https URL.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.serve import client
from mesh.serve.errors import ServeError
from mesh.tracing.errors import ExportError, TracingError
from mesh.tracing.otlp import CONTENT_TYPE, TRACES_PATH

OTLP_HTTP_PORT = 4318
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
CERTIFICATE_ENV = ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE")
HEADERS_ENV = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_RESERVED = frozenset({"content-type", "content-length", "host", "connection", "transfer-encoding"})


def env_value(names: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> str:
    """The first of `names` that is set (and not empty) in `environ`, else ""."""
    return next((environ[n] for n in names if environ.get(n, "").strip()), "").strip()


@dataclass(frozen=True)
class OtlpEndpoint:
    host: str
    port: int = OTLP_HTTP_PORT
    path: str = TRACES_PATH
    scheme: str = "http"

    @classmethod
    def parse(cls, url: str) -> OtlpEndpoint:
        """`http[s]://host[:port][/path]`; `TracingError` saying what is wrong otherwise."""
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TracingError(f"OTLP endpoint {url!r} is not an http or https URL such as "
                               "http://collector:4318/v1/traces")
        if parts.username or parts.password:
            raise TracingError(f"OTLP endpoint {url!r} carries credentials: give them as a header "
                               f"(${HEADERS_ENV[0]}=authorization=...), not in the URL")
        try:
            port = parts.port or OTLP_HTTP_PORT
        except ValueError:
            raise TracingError(f"OTLP endpoint {url!r} has an invalid port") from None
        path = parts.path if parts.path not in ("", "/") else TRACES_PATH
        return cls(parts.hostname, port, path + (f"?{parts.query}" if parts.query else ""), parts.scheme)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def client_endpoint(self) -> client.Endpoint:
        return client.Endpoint.tcp(self.host, self.port)


def parse_headers(text: str, where: str = "headers") -> tuple[tuple[str, str], ...]:
    """OpenTelemetry's header list, `name=value,name2=value2` (values percent-decoded); `TracingError`
    naming the bad entry otherwise.  Names are lower-cased; the transport's own headers cannot be set."""
    out: dict[str, str] = {}
    for i, entry in enumerate(text.split(","), 1):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        name = name.strip().lower()
        if not sep or not _TOKEN.match(name):
            raise TracingError(f"{where}: entry {i} ({entry.strip()[:40]!r}) is not name=value with an HTTP "
                               "header name, e.g. authorization=Bearer%20TOKEN")
        if name in _RESERVED:
            raise TracingError(f"{where}: entry {i}: {name} is set by the exporter itself")
        decoded = urllib.parse.unquote(value.strip())
        if any(c in decoded for c in "\r\n\0"):
            raise TracingError(f"{where}: entry {i}: the value of {name} holds a line break or NUL")
        out[name] = decoded
    return tuple(out.items())


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context that checks the collector's certificate and host name: against `ca_file` (PEM)
    when given, else the system's trust store; `TracingError` when the file cannot be used."""
    if not ca_file:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks certificates and host names; only this CA
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except FileNotFoundError:
            raise TracingError(f"OTLP CA file {ca_file}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            raise TracingError(f"OTLP CA file {ca_file}: not PEM CA certificates ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class Collector:
    """Where spans go and how: the endpoint, the TLS context (https) and the extra headers."""

    endpoint: OtlpEndpoint
    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str = ""
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @classmethod
    def configure(cls, url: str, *, ca_file: str = "", headers: str = "",
                  headers_where: str = "headers") -> Collector:
        """Checked configuration (the CA file read now); `TracingError` saying what is wrong."""
        endpoint = OtlpEndpoint.parse(url)
        extra = parse_headers(headers, headers_where) if headers else ()
        if not endpoint.tls:
            if ca_file:
                raise TracingError(f"a CA file ({ca_file}) is for an https collector, and {endpoint} is plain "
                                   "http: give an https:// URL, or no CA file")
            return cls(endpoint, extra)
        return cls(endpoint, extra, ca_file, tls_context(ca_file))

    def post(self, body: bytes, timeout: float) -> None:
        """POST one export (blocking: the exporter calls it in a worker thread); `ExportError` when the
        collector does not take it."""
        headers = {**dict(self.headers), "content-type": CONTENT_TYPE}
        if self.context is None:
            try:
                reply = client.request(self.endpoint.client_endpoint(), "POST", self.endpoint.path, body,
                                       headers=headers, timeout=timeout)
            except ServeError as exc:
                raise ExportError(f"OTLP collector {self.endpoint}: {exc}") from None
            status, text = reply.status, reply.text
        else:
            status, text = self._post_tls(body, headers, timeout)
        if not 200 <= status < 300:
            raise ExportError(f"OTLP collector {self.endpoint} answered {status}: {text.strip()[:200]}")

    def _post_tls(self, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, str]:
        ep = self.endpoint
        conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=self.context)
        try:
            conn.request("POST", ep.path, body=body, headers=headers)
            reply = conn.getresponse()
            return reply.status, reply.read(64 * 1024).decode("utf-8", "replace")
        except ssl.SSLCertVerificationError as exc:
            trust = f"the CA file {self.ca_file}" if self.ca_file else "the system's trust store"
            raise ExportError(f"OTLP collector {ep}: its certificate does not verify against {trust} "
                              f"({exc.verify_message}): is that the CA that signed it?") from None
        except ssl.SSLError as exc:
            raise ExportError(f"OTLP collector {ep}: TLS failed ({exc.reason or exc}): does it serve https "
                              "on that port?") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ExportError(f"OTLP collector {ep}: {str(exc) or type(exc).__name__}") from None
        finally:
            conn.close()
