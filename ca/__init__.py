"""The mesh certificate authority.

- `ca.authority`: the signing key and chain (generated root, or plugged-in Istio-style `cacerts`) and
  leaf signing.
- `ca.csr`: sans-IO checks of a certificate signing request.
- `ca.auth`: who is calling (the `Authenticator` interface, local JWT node tokens and their issuer).
- `ca.pods`: the narrow question the CA asks of the cluster state (`PodLocator`).
- `ca.policy`: the decision "may this caller have a certificate for that identity?".
- `ca.service`: the request pipeline and its gRPC servicers; `add_to_server()`.
- `ca.serving`: the control plane's own serving certificate and gRPC server credentials.
- `ca.metrics`: Prometheus metrics with Istio's CA metric names.
- `ca.inspect`: explain a certificate for humans (`meshctl ca check`).
- `ca.serve`: a standalone CA gRPC server (tests, benchmarks, `python -m ca.serve`).
"""
