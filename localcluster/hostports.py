"""Host ports of the local cluster: a userspace port forwarder, what kind's `extraPortMappings` (and the
container runtime's proxy behind them) are for a kind cluster.

    python -m localcluster.hostports --config FILE --ports-file FILE

FILE (JSON) says where connections go: `{"netns": NODE_NETNS, "forward": ["NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT",
...]}` (`format_config`).  Each forward listens on HOST_IP:HOST_PORT in the host's own network namespace
(port 0: any free port) and relays every connection, both ways with half-close, to POD_IP:POD_PORT,
dialled from inside the node's namespace `NODE_NETNS` (where the pod network is routed; the host's
namespace has no route to it, and no rule is added there).  Once every listener is bound, the ports are
written to the ports file as JSON (`{"NAME": port}`), which is how the local cluster's controller learns
what it publishes.  SIGTERM stops it.

SIGHUP re-reads the configuration: a re-target, as a Service's endpoints change behind its address.  A
forward whose name already listens on the same host address (HOST_PORT 0, or the port it has) keeps its
listener and port, and its next connections go to the new pod address, from the new namespace;
connections already relayed go on to the old pod until they end (`retarget`).  A new name is bound, a
name no longer there stops listening, and the ports file is written again.  A configuration that cannot
be read is logged and changes nothing, and the ports file is not written: the controller, which removes
the file before it signals, sees it.  This is how an ingress gateway's pod is replaced while its host
ports stay (`localcluster.ingress`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from mesh import logs
from mesh import netns as mnetns
from mesh.files import write_atomic
from mesh.hbone.relay import relay

log = logging.getLogger("localcluster.hostports")

CONNECT_TIMEOUT = 5.0  # seconds to reach the pod


@dataclass(frozen=True)
class Forward:
    name: str
    host: str
    host_port: int
    pod: str
    pod_port: int

    def __str__(self) -> str:
        return f"{self.name}={self.host}:{self.host_port}={self.pod}:{self.pod_port}"


@dataclass(frozen=True)
class Config:
    netns: str  # the node's namespace, where connections to the pod start
    forwards: tuple[Forward, ...]


def _address(text: str, what: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"forward {flag!r}: {what} {text!r} is not IPv4:PORT") from None
    if not sep or not 0 <= number <= 65535:
        raise ValueError(f"forward {flag!r}: {what} {text!r} is not IPv4:PORT")
    return host, number


def parse_forward(text: str) -> Forward:
    """`NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT`; `ValueError` saying what is wrong."""
    parts = text.split("=")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"forward {text!r}: write NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT")
    host, host_port = _address(parts[1], "the host address", text)
    pod, pod_port = _address(parts[2], "the pod address", text)
    if pod_port == 0:
        raise ValueError(f"forward {text!r}: the pod's port must not be 0")
    return Forward(parts[0], host, host_port, pod, pod_port)


def format_config(netns: str, forwards: Sequence[Forward]) -> bytes:
    """The configuration file's content (see the module docstring)."""
    return json.dumps({"netns": netns, "forward": [str(fw) for fw in forwards]}).encode()


def parse_config(data: bytes) -> Config:
    """A configuration file's content; `ValueError` saying what is wrong."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("netns"), str) or not doc["netns"] \
            or not isinstance(doc.get("forward"), list) or not doc["forward"]:
        raise ValueError('write {"netns": NODE_NETNS, "forward": ["NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT", ...]}')
    forwards = tuple(parse_forward(str(text)) for text in doc["forward"])
    names = [fw.name for fw in forwards]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"forward names must differ: {', '.join(twice)} given more than once")
    return Config(doc["netns"], forwards)


def retarget(bound: Mapping[str, tuple[str, int]], forwards: Sequence[Forward]) -> tuple[list[str], list[Forward]]:
    """What a new configuration changes, given the listeners bound (name -> host address and port): the
    names whose listeners close, and the forwards to bind.  A forward keeps its name's listener (and port)
    when it asks for the same host address, on port 0 or the bound one; only where it sends changes."""
    kept = {fw.name for fw in forwards
            if fw.name in bound and bound[fw.name][0] == fw.host and fw.host_port in (0, bound[fw.name][1])}
    return sorted(set(bound) - kept), [fw for fw in forwards if fw.name not in kept]


async def dial(netns: str, address: str, port: int) -> trio.SocketStream:
    """A TCP connection to address:port made from inside network namespace `netns`."""
    with mnetns.entered(netns):  # the socket belongs to the namespace it is created in
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@dataclass(frozen=True)
class _Listening:
    scope: trio.CancelScope  # its accept loop's
    listeners: list[trio.SocketListener]
    host: str
    port: int


class Forwarder:
    """The listeners and where their connections go now; `apply` moves it to a configuration.  Connections
    are handled in `nursery`, outside the listeners' scopes, so a listener that closes leaves its
    connections relaying."""

    def __init__(self, nursery: trio.Nursery, ports_file: Path) -> None:
        self.nursery = nursery
        self.ports_file = ports_file
        self.config = Config("", ())
        self.listening: dict[str, _Listening] = {}

    async def apply(self, config: Config, *, strict: bool) -> None:
        """Listen and send as `config` says (`retarget`), then write the ports file.  A port that cannot
        be bound raises when `strict` (at the start), else it is logged and its forward left out."""
        close, bind = retarget({n: (li.host, li.port) for n, li in self.listening.items()}, config.forwards)
        for name in close:  # closed now, not when its loop next runs: its port is free when the file is written
            gone = self.listening.pop(name)
            gone.scope.cancel()
            for listener in gone.listeners:
                listener.socket.close()
        self.config = config  # what connections accepted from now on use
        for fw in bind:
            try:
                listeners = await trio.open_tcp_listeners(fw.host_port, host=fw.host)
            except OSError as exc:
                if strict:
                    raise
                log.warning("%s: cannot listen on %s:%d: %s; it is not forwarded", fw.name, fw.host, fw.host_port,
                            exc)
                continue
            scope = trio.CancelScope()
            self.listening[fw.name] = _Listening(scope, listeners, fw.host, listeners[0].socket.getsockname()[1])
            self.nursery.start_soon(self._serve, scope, fw.name, listeners)
        ports = {name: li.port for name, li in self.listening.items()}
        write_atomic(self.ports_file, json.dumps(ports).encode())
        sent = {f"{fw.host}:{ports[fw.name]}": f"{fw.pod}:{fw.pod_port}" for fw in config.forwards if fw.name in ports}
        log.info('{"event": "forwarding", "netns": "%s", "ports": %s}', config.netns, json.dumps(sent))

    async def _serve(self, scope: trio.CancelScope, name: str, listeners: list[trio.SocketListener]) -> None:
        with scope:
            await trio.serve_listeners(partial(self._connection, name), listeners, handler_nursery=self.nursery)

    async def _connection(self, name: str, client: trio.SocketStream) -> None:
        config = self.config
        fw = next((f for f in config.forwards if f.name == name), None)
        if fw is None:  # accepted as its listener closed
            await trio.aclose_forcefully(client)
            return
        try:
            upstream = await dial(config.netns, fw.pod, fw.pod_port)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("%s: cannot reach %s:%d from %s: %s", fw.name, fw.pod, fw.pod_port, config.netns, exc)
            await trio.aclose_forcefully(client)
            return
        await relay(client, upstream)


def load(path: Path) -> Config:
    """The configuration in `path`; `ValueError` saying what is wrong (its node namespace missing too)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    config = parse_config(data)
    if not mnetns.exists(config.netns):
        raise ValueError(f"netns {config.netns!r}: no such network namespace")
    return config


async def serve(config_path: Path, config: Config, ports_file: Path) -> None:
    """Forward as `config` says until SIGTERM or SIGINT, taking the configuration in `config_path` again
    at each SIGHUP."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            forwarder = Forwarder(nursery, ports_file)
            await forwarder.apply(config, strict=True)
            async for signum in signals:
                if signum != signal.SIGHUP:
                    break
                try:
                    new = load(config_path)
                except ValueError as exc:
                    log.warning("%s: %s; forwarding as before", config_path, exc)
                    continue
                await forwarder.apply(new, strict=False)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostports", description="Publish pod ports on the host (a userspace "
                                "forwarder); SIGHUP re-reads the configuration.")
    p.add_argument("--config", required=True, type=Path, metavar="FILE",
                   help='where connections go (JSON): {"netns": NODE_NETNS, "forward": '
                        '["NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT", ...]}')
    p.add_argument("--ports-file", required=True, type=Path, help="where the bound host ports are written (JSON)")
    args = p.parse_args(argv)
    try:
        config = load(args.config)
    except ValueError as exc:
        p.error(f"--config: {exc}")
    logs.configure("info")
    failed = []
    try:
        trio.run(serve, args.config, config, args.ports_file)
    except* OSError as group:  # a port that cannot be bound
        failed = [str(e) for e in group.exceptions]
    for problem in failed:
        print(f"hostports: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
