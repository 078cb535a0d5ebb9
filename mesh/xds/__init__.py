"""The discovery (delta xDS) client library and the resource types it carries.

- `mesh.xds.resources`: type URLs, resource names, packing and versions of the discovery messages.
- `mesh.xds.node`: how a client names itself (`NodeInfo`).
- `mesh.xds.client_state`: the protocol, without I/O (responses in; ACK/NACK and updates out).
- `mesh.xds.client`: `XdsClient`, the thread-based client (reconnect, backoff, resume, last good config).
- `mesh.xds.trio_client`: `open_xds_client`, the same for trio code (handler runs in trio).
"""
