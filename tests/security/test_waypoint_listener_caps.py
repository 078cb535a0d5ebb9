"""The caps of the waypoint's HBONE listener (15008) are flags, checked, and applied.

- `--hbone-max-connections`, `--hbone-max-handshakes` (the node agent's names) and `--hbone-max-streams`
  reach the options; a value below 1, above the stream bound, or not a number is refused naming the flag;
- the waypoint's assembly (`WaypointApp`) builds its inbound listener with them: with
  `--hbone-max-connections 1` a second HBONE connection is closed as soon as it is accepted, and the
  streams a client may open on one connection are announced as the cap.
"""

from __future__ import annotations

import ssl
from contextlib import suppress
from pathlib import Path

import pytest
import trio

from mesh.hbone.config import HboneConfig
from mesh.hbone.pool import HbonePool, tcp_connect
from mesh.identity import SpiffeId
from mesh.secrets.tls import client_context
from tests.unit.waypoint.waypoint_hbone_helpers import SLEEP_ID, WAYPOINT_ID, running_ca
from waypoint.inbound import InboundServer
from waypoint.main import parse_args
from waypoint.options import MAX_STREAMS, Options
from waypoint.proxy import WaypointProxy
from waypoint.upstream.connect import HboneUpstream

pytestmark = pytest.mark.timeout(60)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "root.pem").write_text("x")
    (tmp_path / "token").write_text("x")
    return ["--name", "waypoint", "--namespace", "bookinfo", "--node", "n1", "--control-plane", "127.0.0.1:15012",
            "--root-cert", str(tmp_path / "root.pem"), "--token-file", str(tmp_path / "token"), *extra]


def test_the_caps_are_flags(tmp_path: Path) -> None:
    opts = parse_args(_args(tmp_path, "--hbone-max-connections", "10", "--hbone-max-handshakes", "2",
                            "--hbone-max-streams", "7"))
    assert (opts.hbone_limits.max_connections, opts.hbone_limits.max_handshakes) == (10, 2)
    assert opts.hbone_config.max_concurrent_streams == 7
    defaults = parse_args(_args(tmp_path))
    assert defaults.hbone_config.max_concurrent_streams == HboneConfig().max_concurrent_streams


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--hbone-max-connections", "0", "--hbone-max-connections must be a whole number of at least 1, not 0"),
    ("--hbone-max-handshakes", "-3", "--hbone-max-handshakes must be a whole number of at least 1, not -3"),
    ("--hbone-max-streams", "0", "--hbone-max-streams must be a whole number of at least 1, not 0"),
    ("--hbone-max-streams", str(MAX_STREAMS + 1), f"--hbone-max-streams must be at most {MAX_STREAMS}"),
    ("--hbone-max-connections", "many", "argument --hbone-max-connections: invalid int value: 'many'"),
])
def test_bad_caps_are_refused_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                              value: str, says: str) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(_args(tmp_path, flag, value))
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


def test_options_built_in_code_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--hbone-max-handshakes"):
        Options(name="w", namespace="n", node="n1", control_plane="x:1", root_cert=tmp_path, token_file=tmp_path,
                hbone_max_handshakes=0)


async def _tls(port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    await stream.do_handshake()
    return stream


def test_the_listener_applies_the_connection_cap(tmp_path: Path) -> None:
    opts = parse_args(_args(tmp_path, "--hbone-max-connections", "1", "--hbone-max-streams", "3"))

    async def main() -> None:
        with running_ca(tmp_path / "ca") as ca:
            certs, ca_client = ca.secret_manager(WAYPOINT_ID)
            ctx = client_context(ca.mint(SLEEP_ID))
            with ca_client:
                async with trio.open_nursery() as n:
                    await n.start(certs.run)
                    proxy = WaypointProxy(HboneUpstream(HbonePool(tcp_connect, certs.client_context), WAYPOINT_ID))
                    inbound = InboundServer(proxy, certs, SpiffeId.parse(str(WAYPOINT_ID)),
                                            limits=opts.hbone_limits, config=opts.hbone_config,
                                            event_log=lambda _line: None)
                    port = await n.start(inbound.serve, "127.0.0.1", 0)
                    first = await _tls(port, ctx)
                    await first.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9))  # preface, empty SETTINGS
                    frame = await first.receive_some(65536)  # the server's SETTINGS
                    assert frame[3] == 0x4  # SETTINGS
                    settings = {int.from_bytes(frame[9 + i:11 + i], "big"): int.from_bytes(frame[11 + i:15 + i], "big")
                                for i in range(0, int.from_bytes(frame[:3], "big"), 6)}
                    assert settings[0x3] == 3  # SETTINGS_MAX_CONCURRENT_STREAMS
                    with trio.fail_after(10):
                        while inbound.gate.connections < 1:
                            await trio.sleep(0.01)
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)  # over the cap: closed once accepted
                    with trio.fail_after(10), suppress(trio.BrokenResourceError):  # a reset: closed all the same
                        assert await tcp.receive_some(1) == b""
                    assert inbound.gate.refused == 1
                    await first.aclose()
                    await tcp.aclose()
                    n.cancel_scope.cancel()
    trio.run(main)
