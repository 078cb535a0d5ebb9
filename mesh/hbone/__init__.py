"""HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS 1.3 (port 15008).

- `mesh.hbone.protocol` and `sides`: the sans-IO core (`HboneClient`, `HboneServer`): bytes in, events out.
- `mesh.hbone.headers`: building and checking CONNECT requests (`request_headers`, `parse_connect`).
- `mesh.hbone.state`: the connection and stream state machines.
- The trio layer both sides share: `mesh.hbone.handshake` (the TLS handshakes and identity checks),
  `mesh.hbone.tunnel` (`Tunnel`) and `mesh.hbone.transport` (the connection driver), over TLS on the TCP
  socket itself (`mesh.hbone.tlssocket`);
  `mesh.hbone.client` (`HboneClientConnection`, `open_hbone_connection`) and `mesh.hbone.server`
  (`serve_hbone`, `InboundRequest`, `TunnelAcceptor`).
- `mesh.hbone.relay`: `relay()`, copying both ways between two streams with half-close, counting bytes.
- `mesh.hbone.pool`: `HbonePool`, connections pooled by (source, destination identity, next hop).
- The data path engine (the node agent's): `mesh.hbone.engine` (`Engine`: uvloop in a thread beside
  trio), `mesh.hbone.aio` (the core driven by asyncio Protocols over TLS, `TunnelEnd`, `serve_tls`,
  `dial`), `mesh.hbone.aiopool` (`AioPool`), `mesh.hbone.splice` (`Splice`, `PlainEnd`: the relay as
  callbacks).
"""
