"""Helpers shared by the secret manager tests (imported by name: this directory is on sys.path)."""

from __future__ import annotations

from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle, make_csr

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/web")
INTRUDER = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/intruder")


def issue(client: CAClient, root_pem: str, identity: SpiffeId, ttl_seconds: int = 3600) -> Svid:
    """A real SVID from the CA, as a node agent gets one for a pod on its node."""
    key = generate_key()
    chain = client.create_certificate(make_csr(key, identity), ttl_seconds=ttl_seconds, impersonate=identity)
    return accept_issued(chain, key, identity, load_trust_bundle(root_pem))
