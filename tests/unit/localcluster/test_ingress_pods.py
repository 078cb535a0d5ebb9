"""The local cluster's ingress gateway pods (pure parts): what a Gateway of class istio asks the controller
to run, and the host port forwarder's flags; and the forwarder as a real process on the loopback (it binds,
reports its ports and relays to a listener reached from the namespace it is given)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.hostports import Forward, parse_forward
from localcluster.ingress import ingress_pod
from tests.tlsfiles import server_cert

OWN = "/state/waypoints/shop/ingress"


def gateway(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "ingress", "namespace": "shop"},
            "spec": {"gatewayClassName": "istio", "listeners": listeners}}


HTTP = {"name": "http", "port": 80, "protocol": "HTTP"}
HTTPS = {"name": "https", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "cert"}]}}


def secret(chain: bytes, key: bytes, kind: str = "kubernetes.io/tls") -> dict[tuple[str, str], dict[str, Any]]:
    return {("shop", "cert"): {"metadata": {"name": "cert", "namespace": "shop"}, "type": kind,
                               "data": {"tls.crt": base64.b64encode(chain).decode(),
                                        "tls.key": base64.b64encode(key).decode()}}}


def test_an_ingress_pod_runs_the_proxy_in_gateway_mode_with_its_own_identity() -> None:
    cert = server_cert("shop.example.com")
    pod = ingress_pod(gateway([HTTP, HTTPS]), secret(cert.chain, cert.key), OWN)
    assert pod is not None
    assert (pod.key, pod.account) == ("shop/ingress", "ingress-istio")
    assert pod.args == ("--service-account", "ingress-istio", "--listener", "http=HTTP:80", "--listener",
                        f"https=HTTPS:443:{OWN}/https.crt:{OWN}/https.key")
    assert dict(pod.files) == {"https.crt": cert.chain, "https.key": cert.key}
    assert pod.ports == (("http", 80), ("https", 443))
    assert dict(pod.labels) == {"istio.io/dataplane-mode": "none"}


def test_a_new_certificate_or_listener_is_a_new_revision() -> None:
    one, two = server_cert("shop.example.com"), server_cert("shop.example.com")
    def revision(listeners: list[dict[str, Any]], cert: Any) -> str:
        pod = ingress_pod(gateway(listeners), secret(cert.chain, cert.key), OWN)
        assert pod is not None
        return pod.revision

    first = revision([HTTP, HTTPS], one)
    assert revision([HTTP, HTTPS], one) == first
    assert revision([HTTP, HTTPS], two) != first
    assert revision([HTTP], one) != first


@pytest.mark.parametrize("secrets", [{}, secret(b"x", b"y", kind="Opaque")])
def test_an_https_listener_without_a_usable_secret_is_left_out(secrets: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = ingress_pod(gateway([HTTP, HTTPS]), secrets, OWN)
    assert pod is not None and pod.ports == (("http", 80),) and pod.files == ()
    assert ingress_pod(gateway([HTTPS]), secrets, OWN) is None  # nothing to serve: no pod


def test_forward_flags() -> None:
    assert parse_forward("http=127.0.0.1:0=10.244.1.253:80") == Forward("http", "127.0.0.1", 0, "10.244.1.253", 80)


@pytest.mark.parametrize("text,problem", [
    ("127.0.0.1:0=10.0.0.1:80", "write NAME="),
    ("a=localhost:0=10.0.0.1:80", "the host address 'localhost:0' is not IPv4:PORT"),
    ("a=127.0.0.1:99999=10.0.0.1:80", "is not IPv4:PORT"),
    ("a=127.0.0.1:0=10.0.0.1", "the pod address '10.0.0.1' is not IPv4:PORT"),
    ("a=127.0.0.1:0=10.0.0.1:0", "must not be 0"),
])
def test_bad_forward_flags(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_forward(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to enter a network namespace")
def test_the_forwarder_publishes_and_relays(tmp_path: Path) -> None:
    """The real process, with the host's own namespace as the one it dials from (`/proc/self/ns/net`)."""
    target = socket.create_server(("127.0.0.1", 0))
    port = target.getsockname()[1]

    def answer() -> None:
        conn, _ = target.accept()
        with conn:
            data = conn.recv(100)
            conn.sendall(b"echo:" + data)

    threading.Thread(target=answer, daemon=True).start()
    ports_file = tmp_path / "ports.json"
    proc = subprocess.Popen([sys.executable, "-m", "localcluster.hostports", "--netns", "/proc/self/ns/net",
                             "--ports-file", str(ports_file), "--forward", f"web=127.0.0.1:0=127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ports_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        published = json.loads(ports_file.read_text())["web"]
        with socket.create_connection(("127.0.0.1", published), timeout=10) as client:
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b"echo:hello"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        target.close()


def test_the_forwarder_refuses_bad_flags_and_missing_namespaces() -> None:
    out = subprocess.run([sys.executable, "-m", "localcluster.hostports", "--netns", "no-such-netns-here",
                          "--ports-file", "/nonexistent/p.json", "--forward", "a=127.0.0.1:0=10.0.0.1:80"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no such network namespace" in out.stderr
    out = subprocess.run([sys.executable, "-m", "localcluster.hostports", "--netns", "x", "--ports-file", "p",
                          "--forward", "a=1.2.3.4"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "write NAME=" in out.stderr
