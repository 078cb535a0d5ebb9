"""The waypoint's data path on the engine (uvloop in a thread beside trio, `mesh.hbone.engine`):
`inbound` (15008, mutual TLS and CONNECT admission) and `hop` (HTTP/1.1 routed, secured and forwarded from
the transports' callbacks); what the hop does not do itself is handed to trio's `WaypointProxy`."""
