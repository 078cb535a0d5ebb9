"""The discovery side: delta xDS per client stream (sans-IO state), the gRPC server, what each node
needs, and the small HTTP endpoints (proxy-status, debug)."""
