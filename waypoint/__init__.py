"""The waypoint: a per-namespace L7 proxy (routing, resilience, fault injection, request authorization).

Public API for whoever runs it (the HBONE wiring and the local cluster):

- `waypoint.config.compile_table(waypoint, workloads, services, l7_configs, version, allow_http_jwks=)` ->
  `CompileResult`
  (`.table`: a frozen `RouteTable`; `.errors`: `ConfigError`s to NACK; `.warnings`: accepted but not
  enforced as written).
- `waypoint.proxy.WaypointProxy(upstream, table, settings=, metrics=, access_log=, rng=, clock=, jwks=,
  l4_handler=, identity=)`; `.update(table)` / `.apply(result)` swap the table atomically; `await .run()`
  is its background work (JWKS fetched and refreshed);
  `await .serve_tunnel(stream, ClientInfo(peer_identity, source, original_destination))` serves one
  inbound tunnel (HTTP/1.1, HTTP/2 prior knowledge, or L4 through `l4_handler`).
- `waypoint.metrics.WaypointMetrics().registry`: the Prometheus registry to serve on /metrics.
- `waypoint.upstream.pool.Upstream`: `async connect(endpoint, *, service="", client="")`; `TcpUpstream` (plain TCP)
  and `waypoint.upstream.HboneUpstream` (HBONE to endpoints in the mesh, TCP to the others).

The process (`python -m waypoint.main --name NAME --namespace NS --node NODE --control-plane HOST:15012
--root-cert FILE --token-file FILE ...`) is assembled in `waypoint.app` (on `mesh.runtime`): its certificate
from the CA with a workload token, discovery (`waypoint.discovery`: Workloads, Services and the
L7Configs naming it, compiled into a table; a bad resource is NACKed and the last good table kept),
the HBONE inbound on 15008 (`waypoint.inbound`: CONNECT admission, 400 for an authority that is not a
service or workload using this waypoint, L4
policy for tunnels that are not HTTP; by default on the engine, `waypoint.engine`, with HTTP/1.1 served
there and the rest handed to `WaypointProxy` on trio), metrics on 15020, readiness on 15021, admin on 127.0.0.1:15000
(`waypoint.admin`), one JSON access-log line per request on stdout, and a drain on SIGTERM.

Layout: pure decisions in `normalize`, `forwarding`, `routing`, `authz`, `l4authz`, `jwt`, `lb`, `outlier`,
`retry`, `rules`,
`detect.sniff`, `inbound.admit`; I/O in `http1`, `http2`, `pool`, `upstream`, `forward`, `jwks`, `proxy`,
`inbound`, `engine.inbound` and `engine.hop` (the data path on the engine), `app` (the assembly), `options`,
`main` (the command line).
"""
