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
DNS_PORT = 15053  # in each enrolled pod (127.0.0.1): the node agent's DNS proxy, UDP and TCP
DNS_CAPTURE = True  # the DNS proxy captures pods' queries unless --dns-capture=false (on since Istio 1.25)
CONTROLPLANE_GRPC_PORT = 15012  # discovery and CA, TLS
CONTROLPLANE_METRICS_PORT = 15014
CONTROLPLANE_WEBHOOK_PORT = 15017  # the admission webhook (Kubernetes), HTTPS
AGENT_PORTS = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT, ADMIN_PORT, METRICS_PORT, READINESS_PORT)

ADMIN_LISTEN = f"127.0.0.1:{ADMIN_PORT}"
METRICS_LISTEN = f"0.0.0.0:{METRICS_PORT}"
READY_LISTEN = f"0.0.0.0:{READINESS_PORT}"
HBONE_LISTEN = f"0.0.0.0:{HBONE_PORT}"
CONTROLPLANE_GRPC_LISTEN = f"0.0.0.0:{CONTROLPLANE_GRPC_PORT}"
CONTROLPLANE_METRICS_LISTEN = f"0.0.0.0:{CONTROLPLANE_METRICS_PORT}"
CONTROLPLANE_WEBHOOK_LISTEN = f"0.0.0.0:{CONTROLPLANE_WEBHOOK_PORT}"

# -- marks -------------------------------------------------------------------------------------------
AGENT_MARK = 0x539  # SO_MARK on every socket the node agent makes inside a pod (1337)
CONN_MARK = 0x111  # connmark of connections the agent made
MARK_MASK = 0xFFF
LISTENER_UID = 1337  # owner of the agent's listeners in pods: only its own successor may share their ports

# -- preserving the client's address (the destination agent connects to the app from it) -------------
INBOUND_ROUTE_TABLE = 100  # in each pod: `local 0.0.0.0/0 dev lo`, so the app's replies come back to the agent
INBOUND_RULE_PRIORITY = 32764  # the ip rule that sends those replies there (Istio's in-pod mode: table 100, 32764)
TRANSPARENT_PORTS = (20000, 29999)  # the agent's source ports on such connections (eBPF mode routes replies by them)

# -- capture -----------------------------------------------------------------------------------------
REDIRECT_MODES = ("iptables", "ebpf")
REDIRECT_MODE = "iptables"
BPF_PIN_PREFIX = "ambient"  # pinned eBPF maps and links live under /sys/fs/bpf/<prefix>/

# -- limits of each HBONE listener (a pod's 15008, a waypoint's) --------------------------------------
HBONE_MAX_CONNECTIONS = 4096  # connections open at once; more are closed as soon as accepted
HBONE_MAX_HANDSHAKES = 128  # TLS handshakes in progress at once; more wait their turn

# -- timers ------------------------------------------------------------------------------------------
CONNECT_TIMEOUT = 5.0  # seconds
DRAIN_SECONDS = 5.0  # a stopping node agent lets its pods' open connections finish for this long

# gRPC keepalive on 15012, so that a silent partition (no FIN, no RST) ends a discovery stream and the
# client reconnects.  A client pings after this long without reading anything, and gives the connection up
# when the ping is not answered in the timeout; the server pings its clients likewise, and accepts their
# pings no more often than the minimum interval (which must stay below the clients' keepalive time).
XDS_KEEPALIVE_TIME = 20.0  # seconds, client
XDS_KEEPALIVE_TIMEOUT = 10.0  # seconds, client and server
XDS_SERVER_KEEPALIVE_TIME = 30.0  # seconds
XDS_SERVER_MIN_PING_INTERVAL = 10.0  # seconds: pings closer together than this are refused (GOAWAY)

# -- the control plane's state directory (relative to --state-dir) -----------------------------------
CONTROLPLANE_DIR = "controlplane"
CA_DIR = "ca"
CA_KEY_FILE = "ca-key.pem"
TOKEN_KEY_FILE = "node-token-key.pem"
API_SOCKET = "api.sock"
DEBUG_SOCKET = "debug.sock"
