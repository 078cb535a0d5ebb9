"""Host ports of the local cluster: a userspace port forwarder, what kind's `extraPortMappings` (and the
container runtime's proxy behind them) are for a kind cluster.

    python -m localcluster.hostports --netns NODE_NETNS --ports-file FILE \\
        --forward NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT [--forward ...]

Each `--forward` listens on HOST_IP:HOST_PORT in the host's own network namespace (port 0: any free port)
and relays every connection, both ways with half-close, to POD_IP:POD_PORT, dialled from inside the
node's namespace `NODE_NETNS` (where the pod network is routed; the host's namespace has no route to it, and
no rule is added there).  Once every listener is bound, the ports are written to FILE as JSON
(`{"NAME": port}`), which is how the local cluster's controller learns what it publishes.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Sequence
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


def _address(text: str, what: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        number = int(port)
    except ValueError:
        raise ValueError(f"--forward {flag!r}: {what} {text!r} is not IPv4:PORT") from None
    if not sep or not 0 <= number <= 65535:
        raise ValueError(f"--forward {flag!r}: {what} {text!r} is not IPv4:PORT")
    return host, number


def parse_forward(text: str) -> Forward:
    """`NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT`; `ValueError` saying what is wrong."""
    parts = text.split("=")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--forward {text!r}: write NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT")
    host, host_port = _address(parts[1], "the host address", text)
    pod, pod_port = _address(parts[2], "the pod address", text)
    if pod_port == 0:
        raise ValueError(f"--forward {text!r}: the pod's port must not be 0")
    return Forward(parts[0], host, host_port, pod, pod_port)


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


async def _connection(netns: str, fw: Forward, client: trio.SocketStream) -> None:
    try:
        upstream = await dial(netns, fw.pod, fw.pod_port)
    except (OSError, trio.TooSlowError) as exc:
        log.warning("%s: cannot reach %s:%d from %s: %s", fw.name, fw.pod, fw.pod_port, netns, exc)
        await trio.aclose_forcefully(client)
        return
    await relay(client, upstream)


async def serve(netns: str, forwards: Sequence[Forward], ports_file: Path, stop: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        ports = {}
        for fw in forwards:
            listeners = await trio.open_tcp_listeners(fw.host_port, host=fw.host)
            ports[fw.name] = listeners[0].socket.getsockname()[1]
            nursery.start_soon(partial(trio.serve_listeners, partial(_connection, netns, fw), listeners,
                                       handler_nursery=nursery))
        write_atomic(ports_file, json.dumps(ports).encode())
        log.info('{"event": "forwarding", "ports": %s}', json.dumps(
            {f"{fw.host}:{ports[fw.name]}": f"{fw.pod}:{fw.pod_port}" for fw in forwards}))
        await stop.wait()
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostports", description="Publish pod ports on the host (a userspace forwarder).")
    p.add_argument("--netns", required=True, help="the node's network namespace, where connections to pods start")
    p.add_argument("--ports-file", required=True, type=Path, help="where the bound host ports are written (JSON)")
    p.add_argument("--forward", action="append", required=True, metavar="NAME=HOST_IP:HOST_PORT=POD_IP:POD_PORT")
    args = p.parse_args(argv)
    try:
        forwards = [parse_forward(text) for text in args.forward]
    except ValueError as exc:
        p.error(str(exc))
    if not mnetns.exists(args.netns):
        p.error(f"--netns {args.netns!r}: no such network namespace")
    logs.configure("info")

    async def run() -> None:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, args.netns, forwards, args.ports_file, stop)
                async for _ in signals:
                    stop.set()
                    break

    failed = []
    try:
        trio.run(run)
    except* OSError as group:  # a port that cannot be bound
        failed = [str(e) for e in group.exceptions]
    for problem in failed:
        print(f"hostports: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
