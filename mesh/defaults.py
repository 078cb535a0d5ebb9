"""Every default of the mesh in one place: ports, marks, the trust domain, and where the control plane
keeps its state.  Compatible with Istio's, so operators' habits and tools carry over."""

from __future__ import annotations

# -- identity ----------------------------------------------------------------------------------------
TRUST_DOMAIN = "cluster.local"
CLUSTER_DOMAIN = "svc.cluster.local"  # services are <name>.<namespace>.svc.cluster.local
ROOT_NAMESPACE = "istio-system"  # mesh-wide policy lives here

# -- ports -------------------------------------------------------------------------------------------
OUTBOUND_PORT = 15001  # in each enrolled pod: what the application sends, captured
INBOUND_PLAIN_PORT = 15006  # in each enrolled pod: plaintext from callers outside the mesh, captured
HBONE_PORT = 15008  # in each enrolled pod and on waypoints: HBONE inbound
ADMIN_PORT = 15000  # node agent, waypoint: admin, loopback only
METRICS_PORT = 15020  # node agent, waypoint: Prometheus /metrics
READINESS_PORT = 15021  # node agent, waypoint: /healthz/ready
CONTROLPLANE_GRPC_PORT = 15012  # discovery and CA, TLS
CONTROLPLANE_METRICS_PORT = 15014
AGENT_PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT, ADMIN_PORT, METRICS_PORT, READINESS_PORT)

ADMIN_LISTEN = f"127.0.0.1:{ADMIN_PORT}"
METRICS_LISTEN = f"0.0.0.0:{METRICS_PORT}"
READY_LISTEN = f"0.0.0.0:{READINESS_PORT}"
HBONE_LISTEN = f"0.0.0.0:{HBONE_PORT}"
CONTROLPLANE_GRPC_LISTEN = f"0.0.0.0:{CONTROLPLANE_GRPC_PORT}"
CONTROLPLANE_METRICS_LISTEN = f"0.0.0.0:{CONTROLPLANE_METRICS_PORT}"

# -- marks -------------------------------------------------------------------------------------------
AGENT_MARK = 0x539  # SO_MARK on every socket the node agent makes inside a pod (1337)
CONN_MARK = 0x111  # connmark of connections the agent made
MARK_MASK = 0xFFF

# -- capture -----------------------------------------------------------------------------------------
REDIRECT_MODES = ("iptables", "ebpf")
REDIRECT_MODE = "iptables"
BPF_PIN_PREFIX = "ambient"  # pinned eBPF maps and links live under /sys/fs/bpf/<prefix>/

# -- timers ------------------------------------------------------------------------------------------
CONNECT_TIMEOUT = 5.0  # seconds

# -- the control plane's state directory (relative to --state-dir) -----------------------------------
CONTROLPLANE_DIR = "controlplane"
CA_DIR = "ca"
CA_KEY_FILE = "ca-key.pem"
TOKEN_KEY_FILE = "node-token-key.pem"
API_SOCKET = "api.sock"
DEBUG_SOCKET = "debug.sock"
