"""The mesh certificate authority.

- `ca.authority`: the signing key and chain (generated root, or plugged-in Istio-style `cacerts`) and
  leaf signing.
- `ca.csr`: sans-IO checks of a certificate signing request.
- `ca.auth`: who is calling (the `Authenticator` interface, local JWT node tokens and their issuer).
- `ca.tokenreview`: who is calling on Kubernetes (projected service-account tokens, TokenReview).
- `ca.pods`: the narrow question the CA asks of the cluster state (`PodLocator`).
- `ca.policy`: the decision "may this caller have a certificate for that identity?".
- `ca.service`: the request pipeline and its gRPC servicer; `add_to_server()`.
- `ca.serving`: the control plane's own serving certificate and gRPC server credentials.
- `ca.metrics`: Prometheus metrics with Istio's CA metric names.
- `ca.inspect`: explain a certificate for humans (`meshctl ca check`).
- `ca.server`: the one assembly of the CA's gRPC server (state directory → CA → token issuer → service →
  TLS → server): the control plane's, and the one tests, benchmarks and `python -m ca.server` run.
"""
