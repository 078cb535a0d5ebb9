"""The control plane: the configuration store and apply API, translation into discovery resources,
the delta xDS server, and the CA, behind one TLS gRPC port (15012)."""
