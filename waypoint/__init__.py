"""The waypoint: a per-namespace L7 proxy (routing, resilience, fault injection, request authorization).

Public API for whoever runs it (the HBONE wiring and the local cluster):

- `waypoint.config.compile_table(waypoint, workloads, services, l7_configs, version)` -> `CompileResult`
  (`.table`: a frozen `RouteTable`; `.errors`: `ConfigError`s to NACK; `.warnings`: accepted but not
  enforced as written).
- `waypoint.proxy.WaypointProxy(upstream, table, settings=, metrics=, access_log=, rng=, clock=, jwks=,
  l4_handler=)`; `.update(table)` / `.apply(result)` swap the table atomically;
  `await .serve_tunnel(stream, ClientInfo(peer_identity, source, original_destination))` serves one
  inbound tunnel (HTTP/1.1, HTTP/2 prior knowledge, or L4 through `l4_handler`).
- `waypoint.pool.Upstream`: `async connect(endpoint, *, service="") -> trio.abc.HalfCloseableStream`;
  `TcpUpstream` is the plain-TCP implementation.
- `waypoint.metrics.WaypointMetrics().registry`: the Prometheus registry to serve on /metrics.

Layout: pure decisions in `routing`, `authz`, `jwt`, `lb`, `outlier`, `retry`, `rules`, `detect.sniff`;
I/O in `http1`, `http2`, `pool`, `forward`, `jwks`, `proxy`.
"""
