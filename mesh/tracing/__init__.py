"""Distributed tracing, shared by the node agent and the waypoint.

    context.py      trace and span ids, `SpanContext`, `Parent` (what came in)
    propagation.py  W3C traceparent/tracestate and B3 (multi and single header): read and written, pure
    sampler.py      parent-based sampling; the percentage from Istio's Telemetry resources, resolved
    span.py         finished spans and the reporting resource, frozen values
    tracer.py       `Tracer.start` / `finish`: what the data path calls
    otlp.py         OTLP protobuf encoding (mesh/proto/otlp.proto) and decoding
    collector.py    reaching the collector: the OTLP/HTTP URL (http or https), TLS trust, extra headers
    exporter.py     the bounded queue and the background OTLP/HTTP exporter
    receiver.py     an embeddable OTLP/HTTP receiver and a trace store (tests, a dashboard)
"""
