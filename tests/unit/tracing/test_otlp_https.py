"""OTLP over https, for real: a TLS receiver on loopback with a certificate from the project's CA, the exporter
checking it against `--otlp-ca` (or the system's trust store), extra headers from OpenTelemetry's variables,
and a certificate that does not verify is a counted export failure, never a crash.  The flags that set it up
refuse what cannot work, saying why."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from ca.authority import CertificateAuthority
from ca.serving import issue_serving_certificate
from mesh import runtime
from mesh.secrets.tls import https_server_context
from mesh.serve.routes import Request, Response
from mesh.serve.thread import ServerThread
from mesh.tracing.collector import Collector, parse_headers
from mesh.tracing.errors import TracingError
from mesh.tracing.exporter import SpanExporter
from mesh.tracing.receiver import TraceStore, otlp_router
from mesh.tracing.span import Resource, Span, SpanKind
from nodeagent.main import parse_args

pytestmark = pytest.mark.timeout(60)
RESOURCE = Resource.of({"service.name": "nodeagent"})


def span(i: int) -> Span:
    return Span(trace_id=0xA1, span_id=i, parent_span_id=0, name=f"s{i}", kind=SpanKind.CLIENT,
                start_ns=1, end_ns=2)


class TlsCollector:
    """An OTLP/HTTP receiver over https on 127.0.0.1, recording the headers of each export."""

    def __init__(self, authority: CertificateAuthority) -> None:
        cert = issue_serving_certificate(authority, ["127.0.0.1"])
        self.store = TraceStore()
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        router = otlp_router(self.store.add)

        def handler(request: Request) -> Response:
            with self._lock:
                self.headers.append({k: request.header(k) or "" for k in ("authorization", "x-tenant")})
            return router(request)

        self._thread = ServerThread("tls-otlp").tcp(handler, "127.0.0.1", 0, name="OTLP receiver (https)",
                                                    tls=https_server_context(cert.chain_pem, cert.key_pem))
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1/traces"

    def __enter__(self) -> TlsCollector:
        (self.port,) = (int(p) for p in self._thread.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def collector(authority: CertificateAuthority) -> Iterator[TlsCollector]:
    with TlsCollector(authority) as c:
        yield c


@pytest.fixture
def ca_file(tmp_path: Path, authority: CertificateAuthority) -> Path:
    path = tmp_path / "otlp-ca.pem"
    path.write_text(authority.root_pem)
    return path


def export(target: Collector, n: int, registry: CollectorRegistry) -> SpanExporter:
    """Submit `n` spans and flush them, with the exporter's background task running."""
    exporter = SpanExporter(target, RESOURCE, registry, interval=0.05, timeout=2.0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            for i in range(1, n + 1):
                exporter.submit(span(i))
            await exporter.flush()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return exporter


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_spans_go_over_https_to_a_collector_the_given_ca_signed(collector: TlsCollector, ca_file: Path) -> None:
    registry = CollectorRegistry()
    target = Collector.configure(collector.url, ca_file=str(ca_file),
                                 headers="authorization=Bearer%20s3cr%3Dt,x-tenant=team-a")
    export(target, 3, registry)
    assert collector.store.received == 3
    assert collector.headers == [{"authorization": "Bearer s3cr=t", "x-tenant": "team-a"}]
    assert counted(registry, "mesh_trace_spans_exported_total") == 3


def test_a_certificate_that_does_not_verify_is_a_counted_failure(collector: TlsCollector, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_text(CertificateAuthority.load_or_create(tmp_path / "other").root_pem)
    for target, trust in ((Collector.configure(collector.url, ca_file=str(other)), str(other)),
                          (Collector.configure(collector.url), "the system's trust store")):
        registry = CollectorRegistry()
        with caplog.at_level(logging.WARNING, logger="mesh.tracing"):
            export(target, 2, registry)
        assert counted(registry, "mesh_trace_spans_dropped_total", reason="export_failed") == 2
        assert counted(registry, "mesh_trace_spans_exported_total") == 0
        assert "certificate does not verify" in caplog.text and trust in caplog.text
        caplog.clear()
    assert collector.store.received == 0 and collector.headers == []  # the handshake failed: no request


def test_plain_http_to_an_https_collector_fails_clearly(collector: TlsCollector) -> None:
    registry = CollectorRegistry()
    export(Collector.configure(collector.url.replace("https:", "http:")), 1, registry)
    assert counted(registry, "mesh_trace_spans_dropped_total", reason="export_failed") == 1


@pytest.mark.parametrize(("text", "error"), [
    ("authorization", "entry 1 .* is not name=value"),
    ("a=1,bad name=2", "entry 2 .* is not name=value"),
    ("content-type=text/plain", "set by the exporter itself"),
    ("x=a%0Db", "line break"),
])
def test_bad_headers_say_which_entry(text: str, error: str) -> None:
    with pytest.raises(TracingError, match=error):
        parse_headers(text, "$OTEL_EXPORTER_OTLP_HEADERS")


def test_headers_are_parsed_as_opentelemetry_writes_them() -> None:
    assert parse_headers(" Authorization = Basic%20eDp5 ,, x-a=1=2") == (("authorization", "Basic eDp5"), ("x-a", "1=2"))


def test_ca_files_that_cannot_work_are_refused(tmp_path: Path, ca_file: Path) -> None:
    with pytest.raises(TracingError, match="no such file"):
        Collector.configure("https://c:4318", ca_file=str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TracingError, match="not PEM CA certificates"):
        Collector.configure("https://c:4318", ca_file=str(junk))
    with pytest.raises(TracingError, match="is for an https collector"):
        Collector.configure("http://c:4318", ca_file=str(ca_file))


def agent_argv(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "token").write_text("t")
    (tmp_path / "root.pem").write_text("r")
    return ["--node", "n1", "--control-plane", "127.0.0.1:15012", "--root-cert", str(tmp_path / "root.pem"),
            "--token-file", str(tmp_path / "token"), "--pod-netns", "/run/netns/{name}", *extra]


def test_the_flags_and_variables(tmp_path: Path, ca_file: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for var in ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_BSP_SCHEDULE_DELAY",
                "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    opts = parse_args(agent_argv(tmp_path, "--otlp-endpoint", "https://c/v1/traces", "--otlp-ca", str(ca_file)))
    assert opts.otlp_ca == str(ca_file) and opts.otlp_export_interval == 1.0
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca_file))
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=a")
    opts = parse_args(agent_argv(tmp_path, "--otlp-endpoint", "https://c"))
    assert opts.otlp_ca == str(ca_file) and opts.otlp_export_interval == 0.25
    assert runtime.collector(opts.otlp_endpoint, opts.otlp_ca).headers == (("x-tenant", "a"),)
    # OpenTelemetry's CA variable is for an https collector: with plain http, or no collector, it is unused.
    assert parse_args(agent_argv(tmp_path, "--otlp-endpoint", "http://c")).otlp_ca == ""
    assert parse_args(agent_argv(tmp_path)).otlp_ca == ""

    bad = [
        ((), {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant"}, "OTEL_EXPORTER_OTLP_TRACES_HEADERS: entry 1"),
        (("--otlp-ca", str(tmp_path / "nope.pem")), {}, "nope.pem: no such file"),
        (("--otlp-export-interval", "0"), {}, "give a number of seconds above 0"),
        ((), {"OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY 'soon'"),
    ]
    for flags, env, message in bad:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit):
            parse_args(agent_argv(tmp_path, "--otlp-endpoint", "https://c", *flags))
        assert message in capsys.readouterr().err
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=a")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "250")
    with pytest.raises(SystemExit):
        parse_args(agent_argv(tmp_path, "--otlp-ca", str(ca_file)))
    assert "there is no --otlp-endpoint" in capsys.readouterr().err
