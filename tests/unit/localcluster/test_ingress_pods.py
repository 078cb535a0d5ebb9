"""The local cluster's ingress gateway pods (pure parts): what a Gateway of class istio asks the controller
to run, and the host port forwarder's configuration and re-target; and the forwarder as a real process on
the loopback (it binds, reports its ports and relays to a listener reached from the namespace it is given;
on SIGHUP it sends new connections where its new configuration says, on the same ports)."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import spec
from localcluster.hostports import Config, Forward, format_config, parse_config, parse_forward, retarget
from localcluster.ingress import GatewayController, forwards, ingress_pod
from localcluster.plan import make_plan
from localcluster.waypoints import DEFAULT_DRAIN_SECONDS, DRAIN_ANNOTATION, GATEWAY_NAME_LABEL, OWN_DIR
from tests.tlsfiles import server_cert

OWN = "/state/waypoints/shop/ingress"
BOOKINFO = Path(__file__).resolve().parents[3] / "examples" / "bookinfo" / "cluster.yaml"


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


def test_the_pod_reads_its_files_from_its_own_directory_whatever_its_name() -> None:
    """The controller gives `OWN_DIR`, which each pod's start makes its own directory: a new pod beside the
    old one (another name) reads its own copy, and the revision does not depend on the pod's name."""
    cert = server_cert("shop.example.com")
    pod = ingress_pod(gateway([HTTPS]), secret(cert.chain, cert.key), OWN_DIR)
    assert pod is not None and f"https=HTTPS:443:{OWN_DIR}/https.crt:{OWN_DIR}/https.key" in pod.args


def test_the_drain_time_is_the_gateways_as_for_a_waypoint() -> None:
    body = gateway([HTTP])
    pod = ingress_pod(body, {}, OWN)
    assert pod is not None and pod.drain_seconds == DEFAULT_DRAIN_SECONDS
    body["spec"]["infrastructure"] = {"annotations": {DRAIN_ANNOTATION: "1"}}
    pod = ingress_pod(body, {}, OWN)
    assert pod is not None and pod.drain_seconds == 1.0


def test_what_the_forwarder_is_asked_to_publish() -> None:
    assert forwards({"http": 80, "https": 443}, "10.244.2.253") == [
        Forward("http", "127.0.0.1", 0, "10.244.2.253", 80), Forward("https", "127.0.0.1", 0, "10.244.2.253", 443)]


@pytest.mark.parametrize("secrets", [{}, secret(b"x", b"y", kind="Opaque")])
def test_an_https_listener_without_a_usable_secret_is_left_out(secrets: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = ingress_pod(gateway([HTTP, HTTPS]), secrets, OWN)
    assert pod is not None and pod.ports == (("http", 80),) and pod.files == ()
    assert ingress_pod(gateway([HTTPS]), secrets, OWN) is None  # nothing to serve: no pod


def test_a_controller_started_again_adopts_the_gateways_forwarder(tmp_path: Path) -> None:
    """The forwarder is the gateway's, found in the record of the pod that carries it, whatever its name (a
    pod of a roll); the controller does not yet know where it sends, so its first round re-targets it."""
    plan = make_plan(dataclasses.replace(spec.load(BOOKINFO), name="t"))
    controller = GatewayController("t", plan, tmp_path, on_change=lambda c: None)
    forwarder = {"name": "hostports shop/ingress", "pid": 1, "start_time": 1, "netns": "", "log": "x"}
    pod = {"name": "ingress-abcde", "namespace": "shop", "labels": {GATEWAY_NAME_LABEL: "ingress"},
           "node": "node-1", "netns": "n1", "ip": "10.244.1.254", "listeners": {"http": 80}, "forwarder": forwarder}
    controller.adopt("shop/ingress-abcde", pod, {"name": "waypoint shop/ingress-abcde"})
    assert controller.forwarders == {"shop/ingress": forwarder} and controller.targets == {}
    assert controller.running["shop/ingress"]["pod"] is pod


def test_forward_flags() -> None:
    assert parse_forward("http=127.0.0.1:0=10.244.1.253:80") == Forward("http", "127.0.0.1", 0, "10.244.1.253", 80)
    assert str(parse_forward("http=127.0.0.1:0=10.244.1.253:80")) == "http=127.0.0.1:0=10.244.1.253:80"


def test_the_configuration_file() -> None:
    config = Config("amb.c.node.node-1", (Forward("http", "127.0.0.1", 0, "10.244.1.253", 80),
                                          Forward("https", "127.0.0.1", 8443, "10.244.1.253", 443)))
    assert parse_config(format_config(config.netns, config.forwards)) == config


@pytest.mark.parametrize("data,problem", [
    (b"{", "not JSON"),
    (b'{"forward": ["a=127.0.0.1:0=10.0.0.1:80"]}', "write {"),
    (b'{"netns": "n", "forward": []}', "write {"),
    (b'{"netns": "n", "forward": ["a=127.0.0.1:0=10.0.0.1"]}', "the pod address"),
    (b'{"netns": "n", "forward": ["a=127.0.0.1:0=10.0.0.1:80", "a=127.0.0.1:0=10.0.0.2:80"]}',
     "a given more than once"),
])
def test_bad_configurations(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_config(data)


def test_a_retarget_keeps_the_listeners_of_the_names_it_keeps() -> None:
    bound = {"http": ("127.0.0.1", 40001), "https": ("127.0.0.1", 40002), "old": ("127.0.0.1", 40003)}
    new = [Forward("http", "127.0.0.1", 0, "10.244.2.253", 80),  # any port: keeps 40001
           Forward("https", "127.0.0.1", 40002, "10.244.2.253", 443),  # the port it has: kept
           Forward("admin", "127.0.0.1", 0, "10.244.2.253", 15000)]  # a new name: bound
    assert retarget(bound, new) == (["old"], [new[2]])
    # another host address or another port is a new listener in place of the old one
    moved = [Forward("http", "127.0.0.2", 0, "10.244.2.253", 80), Forward("https", "127.0.0.1", 9443, "10.0.0.1", 443)]
    assert retarget(bound, moved) == (["http", "https", "old"], moved)
    assert retarget({}, new) == ([], new)


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


class Echo:
    """A TCP server on the loopback that answers each line with `<name>:<line>`, connection after
    connection, until closed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(f"{self.name}:".encode() + line)

    def close(self) -> None:
        self.server.close()


def ask(conn: socket.socket, text: str) -> str:
    conn.sendall(text.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(100)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data.decode().strip()


HERE = "/proc/self/ns/net"  # the host's own namespace: the one the forwarder dials from in these tests


class Forwarder:
    """The real forwarder process, with its configuration and ports files."""

    def __init__(self, tmp: Path, forwards: list[Forward]) -> None:
        self.config, self.ports_file = tmp / "config.json", tmp / "ports.json"
        self.config.write_bytes(format_config(HERE, forwards))
        self.proc = subprocess.Popen([sys.executable, "-m", "localcluster.hostports", "--config", str(self.config),
                                      "--ports-file", str(self.ports_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ports(self, timeout: float = 20) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while not self.ports_file.exists():
            output = self.proc.stdout.read() if self.proc.stdout and self.proc.poll() is not None else ""
            assert self.proc.poll() is None and time.monotonic() < deadline, output
            time.sleep(0.05)
        return dict(json.loads(self.ports_file.read_text()))

    def retarget(self, forwards: list[Forward], data: bytes | None = None) -> None:
        """Write the new configuration, remove the ports file and signal, as the controller does."""
        self.config.write_bytes(data if data is not None else format_config(HERE, forwards))
        self.ports_file.unlink()
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def echoes() -> Iterator[tuple[Echo, Echo]]:
    one, two = Echo("one"), Echo("two")
    yield one, two
    one.close()
    two.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to enter a network namespace")
def test_the_forwarder_publishes_and_relays(tmp_path: Path, echoes: tuple[Echo, Echo]) -> None:
    """The real process, with the host's own namespace as the one it dials from (`/proc/self/ns/net`);
    half-close goes through."""
    one, _ = echoes
    forwarder = Forwarder(tmp_path, [Forward("web", "127.0.0.1", 0, "127.0.0.1", one.port)])
    try:
        published = forwarder.ports()["web"]
        with socket.create_connection(("127.0.0.1", published), timeout=10) as client:
            client.sendall(b"hello\n")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b"one:hello\n"
    finally:
        forwarder.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to enter a network namespace")
def test_a_retarget_keeps_the_port_and_the_connections_already_relayed(tmp_path: Path,
                                                                        echoes: tuple[Echo, Echo]) -> None:
    """SIGHUP with a new configuration: the same port sends new connections to the new target while a
    connection made before goes on to the old one; a new name is bound, a name left out stops listening; a
    configuration it cannot read changes nothing."""
    one, two = echoes
    forwarder = Forwarder(tmp_path, [Forward("web", "127.0.0.1", 0, "127.0.0.1", one.port),
                                     Forward("old", "127.0.0.1", 0, "127.0.0.1", one.port)])
    try:
        ports = forwarder.ports()
        with socket.create_connection(("127.0.0.1", ports["web"]), timeout=10) as before:
            assert ask(before, "a") == "one:a"
            forwarder.retarget([Forward("web", "127.0.0.1", 0, "127.0.0.1", two.port),
                                Forward("new", "127.0.0.1", 0, "127.0.0.1", two.port)])
            after = forwarder.ports()
            assert after["web"] == ports["web"] and set(after) == {"web", "new"}, after
            with socket.create_connection(("127.0.0.1", ports["web"]), timeout=10) as client:
                assert ask(client, "b") == "two:b"
            with socket.create_connection(("127.0.0.1", after["new"]), timeout=10) as client:
                assert ask(client, "c") == "two:c"
            assert ask(before, "d") == "one:d"  # still relayed to where it was
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", ports["old"]), timeout=10).close()

            forwarder.retarget([], b"{")
            time.sleep(0.5)
            assert not forwarder.ports_file.exists() and forwarder.proc.poll() is None
            with socket.create_connection(("127.0.0.1", ports["web"]), timeout=10) as client:
                assert ask(client, "e") == "two:e"
    finally:
        forwarder.stop()
    output = forwarder.proc.stdout.read() if forwarder.proc.stdout else ""
    assert "forwarding as before" in output and "Traceback" not in output, output


def test_the_forwarder_refuses_bad_configurations_and_missing_namespaces(tmp_path: Path) -> None:
    def run(config: bytes | None) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "config.json"
        path.unlink(missing_ok=True)
        if config is not None:
            path.write_bytes(config)
        return subprocess.run([sys.executable, "-m", "localcluster.hostports", "--config", str(path),
                               "--ports-file", str(tmp_path / "ports.json")],
                              capture_output=True, text=True, timeout=30)

    out = run(format_config("no-such-netns-here", [Forward("a", "127.0.0.1", 0, "10.0.0.1", 80)]))
    assert out.returncode == 2 and "no such network namespace" in out.stderr
    out = run(b'{"netns": "x", "forward": ["a=1.2.3.4"]}')
    assert out.returncode == 2 and "write NAME=" in out.stderr
    out = run(None)
    assert out.returncode == 2 and "cannot read" in out.stderr
    assert not (tmp_path / "ports.json").exists()
