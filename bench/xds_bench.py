"""Discovery benchmark: how fast a change reaches connected clients, and what the control plane costs.

    python -m bench.xds_bench [--applies 10] [--clients 1,10,100] [--sizes 1000,10000]

1. Convergence: the control plane (TLS, in this process, on its own event loop thread) holds 100 pods
   in its real store; N clients connect from a separate process (so they do not compete with the server
   for the interpreter lock).  Each apply goes through the apply API exactly as `meshctl apply` sends it
   (a pod's labels change: validation, store commit, translation, push); the time is measured from
   sending the apply until every one of the N clients has ACKed the new version (as the control plane
   records ACKs).  Reported: p50 and max over the applies.
2. Memory: a fresh control plane process holding W workloads (and W/10 services) with one wildcard
   client connected; its resident set size (VmRSS), and the same for an empty configuration.

Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane.app import ControlPlaneThread, Running
from controlplane.discovery.source import MemorySource
from controlplane.options import Options
from mesh.proto import discovery_pb2 as pb
from mesh.xds import resources as rs
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo


def workload(i: int, generation: int = 0) -> pb.Workload:
    ns = f"ns{i % 20}"
    w = pb.Workload(
        uid=f"{ns}/pod-{i}",
        name=f"pod-{i}",
        namespace=ns,
        addresses=[f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"],
        service_account=f"sa-{i % 50}",
        node=f"node-{i % 10}",
        tunnel_protocol=pb.HBONE,
        canonical_name=f"app-{i % 100}",
        canonical_revision=f"v{generation}",
        workload_type="pod",
    )
    w.labels.update({"app": f"app-{i % 100}", "version": f"v{generation}", "pod-template-hash": "abc123"})
    w.services[f"{ns}/svc-{i % 100}.{ns}.svc.cluster.local"].ports.add(service_port=80, target_port=8080)
    return w


def service(i: int) -> pb.Service:
    ns = f"ns{i % 20}"
    s = pb.Service(
        name=f"svc-{i}", namespace=ns, hostname=f"svc-{i}.{ns}.svc.cluster.local", vips=[f"10.96.{i >> 8 & 255}.{i & 255}"]
    )
    s.ports.add(service_port=80, target_port=8080, name="http", app_protocol="http")
    s.subject_alt_names.append(f"spiffe://cluster.local/ns/{ns}/sa/sa-{i % 50}")
    return s


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- child processes ---------------------------------------------------------------------------------


def clients_child(target: str, root_file: str, count: int) -> None:
    """Hold `count` wildcard clients open until stdin closes; their node tokens are in `tokens` beside the
    root file, one a line (discovery is authenticated)."""
    root = Path(root_file).read_bytes()
    tokens = Path(root_file).with_name("tokens").read_text().split()
    clients = []
    for i in range(count):
        cfg = ClientConfig(
            target=target,
            node=NodeInfo(id=f"nodeagent~bench-{i}~bench-{i}.", role="nodeagent", node=f"bench-{i}"),
            subscriptions={rs.WORKLOAD: None},
            root_pem=root,
            backoff_initial=0.1,
            metadata=(("authorization", f"Bearer {tokens[i]}"),),
        )
        c = XdsClient(cfg)
        c.start()
        clients.append(c)
    print("started", flush=True)
    sys.stdin.read()
    for c in clients:
        c.stop(1)


def memory_child(workloads: int) -> None:
    """A control plane holding `workloads`; prints its port, then its RSS when asked (a line on stdin)."""
    source = MemorySource([*(workload(i) for i in range(workloads)), *(service(i) for i in range(workloads // 10))])
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneThread(
            Options(state_dir=Path(tmp), grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0"), source
        )
        running = cp.start()
        root = Path(tmp) / "root.pem"
        root.write_bytes(running.root_pem or b"")
        token = running.extras["token_issuer"].mint_node_token("m")
        print(json.dumps({"port": running.grpc_port, "root": str(root), "token": token}), flush=True)
        sys.stdin.readline()
        print(json.dumps({"workloads": workloads, "rss_kib": rss_kib()}), flush=True)
        sys.stdin.read()
        cp.stop()


# -- the benchmark ----------------------------------------------------------------------------------


def acked_by(cp: ControlPlaneThread, running: Running, count: int) -> bool:
    """True when `count` streams have ACKed the control plane's current version of workloads."""
    d = running.discovery
    return cp.call(lambda: d.version != "" and d.acked_count(rs.WORKLOAD, d.version) >= count)


def pod_body(i: int, generation: int = 0) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": "bench",
                         "labels": {"app": f"app-{i % 10}", "version": f"v{generation}"}},
            "spec": {"nodeName": f"node-{i % 10}", "containers": [{"name": "app", "command": ["sleep", "infinity"]}]},
            "status": {"phase": "Running", "podIP": f"10.244.{i >> 8}.{i & 255 or 1}"}}


def convergence(counts: list[int], applies: int) -> list[dict[str, Any]]:
    from mesh.api.client import ApiClient, register_cluster_objects
    from mesh.api.validate import Document

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        opts = Options(state_dir=Path(tmp), grpc_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
        cp = ControlPlaneThread(opts)
        running = cp.start()
        socket_path = opts.home / "api.sock"
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench",
                                                                         "labels": {"istio.io/dataplane-mode": "ambient"}}}
        register_cluster_objects(socket_path, [namespace, *(pod_body(i) for i in range(1, 101))])
        api = ApiClient(socket_path)
        root_file = Path(tmp) / "root.pem"
        assert running.root_pem is not None
        root_file.write_bytes(running.root_pem)
        issuer = running.extras["token_issuer"]
        root_file.with_name("tokens").write_text(
            "\n".join(issuer.mint_node_token(f"bench-{i}") for i in range(max(counts, default=0))))
        generation = 0
        for count in counts:
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.xds_bench", "--clients-child", str(count),
                 f"127.0.0.1:{running.grpc_port}", str(root_file)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            try:
                assert child.stdout is not None and child.stdout.readline().strip() == "started"
                deadline = time.monotonic() + 60
                while not acked_by(cp, running, count):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{count} clients did not sync")
                    time.sleep(0.01)
                times = []
                for _ in range(applies):
                    generation += 1
                    before = cp.call(lambda: running.discovery.version)
                    t0 = time.monotonic()
                    api.apply([Document("bench", 1, pod_body(generation % 100 + 1, generation))])
                    while cp.call(lambda: running.discovery.version) == before:
                        time.sleep(0.0005)
                    while not acked_by(cp, running, count):
                        time.sleep(0.0005)
                    times.append(time.monotonic() - t0)
                    time.sleep(0.05)
                results.append(
                    {"clients": count, "applies": applies,
                     "p50_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1)}
                )
            finally:
                assert child.stdin is not None
                child.stdin.close()
                child.wait(30)
        cp.stop()
    return results


def memory(sizes: list[int]) -> list[dict[str, Any]]:
    """RSS of a control plane process per configuration size, with one wildcard client (here) synced."""
    out = []
    for n in [0, *sizes]:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.xds_bench", "--memory-child", str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            info = json.loads(child.stdout.readline())
            cfg = ClientConfig(
                target=f"127.0.0.1:{info['port']}",
                node=NodeInfo(id="nodeagent~m~m.", role="nodeagent", node="m"),
                subscriptions={rs.WORKLOAD: None, rs.SERVICE: None},
                root_pem=Path(info["root"]).read_bytes(),
                metadata=(("authorization", f"Bearer {info['token']}"),),
            )
            with XdsClient(cfg) as c:
                if not c.wait_synced(120):
                    raise RuntimeError("memory benchmark client did not sync")
                received = len(c.resources(rs.WORKLOAD))
                time.sleep(0.3)
                child.stdin.write("measure\n")
                child.stdin.flush()
                result = json.loads(child.stdout.readline())
            result["received"] = received
            out.append(result)
        finally:
            child.stdin.close()
            child.wait(30)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.xds_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--applies", type=int, default=10)
    p.add_argument("--clients", default="1,10,100")
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--json", action="store_true")
    p.add_argument("--clients-child", nargs=3, metavar=("N", "TARGET", "ROOT"), help=argparse.SUPPRESS)
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients_child:
        n, target, root = args.clients_child
        clients_child(target, root, int(n))
        return 0
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return 0

    conv = convergence([int(c) for c in args.clients.split(",") if c], args.applies)
    mem = memory([int(s) for s in args.sizes.split(",") if s])
    if args.json:
        print(json.dumps({"convergence": conv, "memory": mem}))
        return 0
    print("time from a change until N clients have ACKed it (TLS, 127.0.0.1)")
    print(f"{'clients':>8} {'applies':>8} {'p50 ms':>8} {'max ms':>8}")
    for r in conv:
        print(f"{r['clients']:>8} {r['applies']:>8} {r['p50_ms']:>8} {r['max_ms']:>8}")
    print()
    base = mem[0]["rss_kib"]
    print("control plane memory (process RSS, one connected wildcard client)")
    print(f"{'workloads':>10} {'RSS MiB':>8} {'over empty MiB':>15}")
    for m in mem:
        print(f"{m['workloads']:>10} {m['rss_kib'] / 1024:>8.1f} {(m['rss_kib'] - base) / 1024:>15.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
