"""What a control plane is started with, and the layout of its state directory.

DIR (`--state-dir`) is the cluster's state directory; the control plane keeps everything under
`DIR/controlplane/` (`Options.home`):

    ca/                  the CA's root and signing key (generated on first start; see `ca.server`);
                         clients trust `ca/root-cert.pem`
    node-token-key.pem   the key tokens are signed with (read by `ca.server` only; tokens are asked of the
                         apply API's `/token`), and `node-token-key.retiring.json`, the keys it replaced
    store/               the configuration store
    api.sock             the apply API (the config store's server, and the token minter)
    debug.sock           local-only HTTP: /debug/connections (what `meshctl proxy-status` reads), /metrics
    endpoints.json       written once serving: {"pid", "grpc", "metrics", "debug_socket"} with the real ports
                         (and "webhook" on Kubernetes)

Where the configuration comes from (`config_source`): `local`, the store above, written through the apply
API (`meshctl apply`, the local cluster); or `kubernetes`, the cluster's API (`controlplane.config.kubernetes`,
through `kubeconfig` or, by default, the pod's in-cluster configuration), with callers authenticated by
TokenReview (`ca.tokenreview`) and the admission webhook on `webhook_listen`.  There the store is kept in
memory and the apply API is not served: the cluster's objects are written with kubectl.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ca.auth import DEFAULT_TOKEN_TTL
from ca.server import DEFAULT_SERVING_HOSTS
from ca.tokenreview import DEFAULT_NODE_AGENT_ACCOUNTS
from mesh import defaults
from mesh.process import split_hostport

STORE_DIR = "store"
ENDPOINTS_FILE = "endpoints.json"
LOCAL, KUBERNETES = "local", "kubernetes"
CONFIG_SOURCES = (LOCAL, KUBERNETES)


@dataclass
class Options:
    state_dir: Path
    grpc_listen: str = defaults.CONTROLPLANE_GRPC_LISTEN
    metrics_listen: str = defaults.CONTROLPLANE_METRICS_LISTEN
    trust_domain: str = defaults.TRUST_DOMAIN
    serving_hosts: list[str] = field(default_factory=list)  # names clients dial; default localhost, 127.0.0.1
    plaintext: bool = False  # gRPC without TLS (debugging only)
    debounce: float = 0.0  # seconds to gather changes before a push
    config_source: str = LOCAL  # one of CONFIG_SOURCES
    kubeconfig: Path | None = None  # kubernetes: None means the pod's in-cluster configuration
    webhook_listen: str = defaults.CONTROLPLANE_WEBHOOK_LISTEN  # kubernetes: the admission webhook (HTTPS)
    node_agent_accounts: list[str] = field(default_factory=lambda: list(DEFAULT_NODE_AGENT_ACCOUNTS))  # NS/SA
    sync_timeout: float = 60.0  # kubernetes: seconds to list every collection before serving
    token_ttl: float = DEFAULT_TOKEN_TTL.total_seconds()  # seconds: the default and longest life of a token
    token_key_rotation: float = 0.0  # seconds: rotate the token key when it is this old; 0 only when asked

    @property
    def home(self) -> Path:
        return self.state_dir / defaults.CONTROLPLANE_DIR

    def tls_hosts(self) -> list[str]:
        """The names and addresses the serving certificate carries: those given (or loopback), and the
        listen address unless it is a wildcard."""
        host, _ = split_hostport(self.grpc_listen)
        hosts = list(self.serving_hosts) or list(DEFAULT_SERVING_HOSTS)
        if host not in ("0.0.0.0", "::") and host not in hosts:
            hosts.append(host)
        return hosts
