"""The CA's Prometheus metrics, registered in a registry the caller passes in (the control plane serves
it on 15014).

Istio's CA metric names are kept where they exist, exposed with exactly those names (as untyped
samples, because the Prometheus client library would otherwise append `_total` to counters):

    citadel_server_csr_count                       every CreateCertificate request
    citadel_server_success_cert_issuance_count     certificates issued
    citadel_server_authentication_failure_count    bad or missing tokens
    citadel_server_csr_parsing_err_count           CSRs that cannot be parsed or do not verify
    citadel_server_id_extraction_err_count         CSRs whose SAN is not the allowed identity
    citadel_server_csr_sign_err_count              failures inside the signer
    citadel_server_root_cert_expiry_timestamp      when the root expires (unix seconds)
    citadel_server_cert_chain_expiry_timestamp     when the signing certificate expires (unix seconds)

and every refusal is also counted by reason in `mesh_ca_request_errors_total{reason=...}`, issuance
latency in `mesh_ca_issuance_seconds`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

# error reason -> the Istio counter it also increments
ISTIO_ERROR_COUNTERS = {
    "unauthenticated": "citadel_server_authentication_failure_count",
    "bad_csr": "citadel_server_csr_parsing_err_count",
    "bad_san": "citadel_server_id_extraction_err_count",
    "signing": "citadel_server_csr_sign_err_count",
}

_HELP = {
    "citadel_server_csr_count": "Number of certificate signing requests received.",
    "citadel_server_success_cert_issuance_count": "Number of certificates issued.",
    "citadel_server_authentication_failure_count": "Number of requests refused for bad credentials.",
    "citadel_server_csr_parsing_err_count": "Number of CSRs that could not be parsed or verified.",
    "citadel_server_id_extraction_err_count": "Number of CSRs asking for an identity the caller may not have.",
    "citadel_server_csr_sign_err_count": "Number of signing failures inside the CA.",
}


class CAMetrics:
    """Counters the CA service updates; thread-safe."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_HELP, 0.0)
        self._root_expiry: float | None = None
        self._chain_expiry: float | None = None
        self.errors = Counter(
            "mesh_ca_request_errors",
            "CreateCertificate requests refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "mesh_ca_issuance_seconds",
            "Time to check and sign one certificate request.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        registry.register(_IstioCollector(self))

    def request(self) -> None:
        self._add("citadel_server_csr_count")

    def issued(self, seconds: float) -> None:
        self._add("citadel_server_success_cert_issuance_count")
        self.latency.observe(seconds)

    def refused(self, reason: str) -> None:
        self.errors.labels(reason=reason).inc()
        istio_name = ISTIO_ERROR_COUNTERS.get(reason)
        if istio_name is not None:
            self._add(istio_name)

    def set_expiries(self, root_not_after: float, chain_not_after: float) -> None:
        with self._lock:
            self._root_expiry = root_not_after
            self._chain_expiry = chain_not_after

    def value(self, name: str) -> float:
        """The current value of one of the Istio-named counters (for tests and the admin view)."""
        with self._lock:
            return self._counts[name]

    def _add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _snapshot(self) -> tuple[dict[str, float], float | None, float | None]:
        with self._lock:
            return dict(self._counts), self._root_expiry, self._chain_expiry


class _IstioCollector:
    def __init__(self, metrics: CAMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts, root_expiry, chain_expiry = self._metrics._snapshot()
        for name, value in counts.items():
            m = Metric(name, _HELP[name], "unknown")
            m.add_sample(name, {}, value)
            yield m
        for name, when, doc in (
            ("citadel_server_root_cert_expiry_timestamp", root_expiry, "Unix time the mesh root expires."),
            ("citadel_server_cert_chain_expiry_timestamp", chain_expiry, "Unix time the CA certificate expires."),
        ):
            if when is not None:
                g = Metric(name, doc, "gauge")
                g.add_sample(name, {}, when)
                yield g
