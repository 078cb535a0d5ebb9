"""Client side of the mesh CA, shared by node agents and waypoints.

- `mesh.secrets.svid`: keys, CSRs, and checking what the CA returned (`Svid`).
- `mesh.secrets.x509`: certificates as plain data, read from their DER (`Certificate`).
- `mesh.secrets.openssl`: P-256 keys, signatures and path validation through the `ssl` module's OpenSSL.
- `mesh.secrets.renewal`: when to renew, and the backoff schedule after failures (sans-IO).
- `mesh.secrets.client`: `CAClient`, the synchronous gRPC client of `CreateCertificate`.
- `mesh.secrets.tls`: TLS 1.3 contexts for an `Svid` and `check_peer()` for SPIFFE SANs.
- `mesh.secrets.manager`: `SecretManager`, the trio component that caches and renews certificates per
  identity and hands out current TLS contexts.
"""
