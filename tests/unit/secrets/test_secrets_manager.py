"""`SecretManager` under trio against a real CA: first certificate, renewal at half-life with a short
TTL (observed, with a live TLS connection surviving it), backoff while the CA is away."""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
from cryptography import x509
from secrets_helpers import SLEEP, WEB

from ca.server import RunningCA
from mesh.secrets.client import CAClient
from mesh.secrets.errors import CertificateRequestError, NoCertificateError, SecretsError
from mesh.secrets.manager import SecretManager
from mesh.secrets.renewal import RenewalPolicy, RenewalState
from mesh.secrets.tls import check_peer


def run_with_manager(manager: SecretManager, body: Callable[[SecretManager], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            with trio.fail_after(20):
                await body(manager)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def test_first_certificate_and_contexts(node_a: CAClient, running_ca: RunningCA) -> None:
    manager = SecretManager(node_a, running_ca.root_pem, impersonate=True)

    async def body(m: SecretManager) -> None:
        with pytest.raises(NoCertificateError):
            m.server_context(SLEEP)
        svid = await m.get(SLEEP)
        assert svid.identity == SLEEP
        assert await m.get(SLEEP) is svid  # cached
        assert m.current(SLEEP) is svid and m.generation(SLEEP) == 1
        assert m.server_context(SLEEP) is not None and m.client_context(SLEEP) is not None
        [status] = m.status()
        assert status.identity == str(SLEEP) and status.state == "valid"
        assert status.serial == format(svid.leaf.serial_number, "x")  # what `meshctl agent certs` shows
        assert status.not_before == svid.leaf.not_valid_before_utc.isoformat()
        assert status.chain == svid.chain_pem().decode()  # `meshctl agent certs --chain`, for `ca check`
        m.forget(SLEEP)
        assert m.current(SLEEP) is None and m.identities() == []

    run_with_manager(manager, body)


def test_refusal_reaches_the_caller(node_a: CAClient, running_ca: RunningCA) -> None:
    manager = SecretManager(node_a, running_ca.root_pem, impersonate=True)

    async def body(m: SecretManager) -> None:
        with pytest.raises(CertificateRequestError, match="PERMISSION_DENIED"):
            await m.get(WEB)  # web runs on node-b
        assert m.identities() == []

    run_with_manager(manager, body)


def test_get_needs_a_running_manager(node_a: CAClient, running_ca: RunningCA) -> None:
    manager = SecretManager(node_a, running_ca.root_pem, impersonate=True)
    with pytest.raises(SecretsError, match="not running"):
        trio.run(manager.get, SLEEP)


def test_renewal_at_half_life_keeps_live_connections(node_a: CAClient, running_ca: RunningCA) -> None:
    manager = SecretManager(node_a, running_ca.root_pem, impersonate=True, ttl_seconds=4)

    async def body(m: SecretManager) -> None:
        first = await m.get(SLEEP)
        lifetime = first.not_after - first.not_before
        assert 4 <= lifetime <= 5

        # A live mTLS connection (sleep talking to itself) made with the first certificate.
        async def echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
            await stream.do_handshake()
            check_peer(stream, allowed={SLEEP})
            while data := await stream.receive_some(100):
                await stream.send_all(data)

        async def handler(raw: trio.SocketStream) -> None:
            await echo(trio.SSLStream(raw, m.server_context(SLEEP), server_side=True))

        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]

            async def connect() -> trio.SSLStream[trio.SocketStream]:
                raw = await trio.open_tcp_stream("127.0.0.1", port)
                stream = trio.SSLStream(raw, m.client_context(SLEEP), server_hostname=None)
                await stream.do_handshake()
                check_peer(stream, allowed={SLEEP})
                return stream

            live = await connect()
            first_serial = x509.load_der_x509_certificate(live.getpeercert(binary_form=True)).serial_number
            assert first_serial == first.leaf.serial_number

            await wait_for(lambda: m.generation(SLEEP) >= 2, timeout=6)
            second = m.current(SLEEP)
            assert second is not None and second.leaf.serial_number != first.leaf.serial_number
            assert second.key != first.key  # a new key each time
            renewed_after = second.not_before - first.not_before
            assert 1 <= renewed_after <= 3.5  # around half of the 4 s lifetime

            await live.send_all(b"still here")  # the old connection carries on
            assert await live.receive_some(100) == b"still here"

            fresh = await connect()  # a new connection uses the renewed certificate
            fresh_serial = x509.load_der_x509_certificate(fresh.getpeercert(binary_form=True)).serial_number
            assert fresh_serial == second.leaf.serial_number
            await fresh.aclose()
            await live.aclose()
            nursery.cancel_scope.cancel()

    run_with_manager(manager, body)


def test_backoff_while_the_ca_is_away(node_a: CAClient, running_ca: RunningCA) -> None:
    policy = RenewalPolicy(initial_backoff=0.2, max_backoff=0.5)
    manager = SecretManager(
        node_a, running_ca.root_pem, impersonate=True, ttl_seconds=2, policy=policy, rng=random.Random(3)
    )

    async def body(m: SecretManager) -> None:
        svid = await m.get(SLEEP)
        running_ca.stop(None)  # the CA goes away before the renewal is due
        await wait_for(lambda: m.status()[0].failures >= 3, timeout=8)
        [status] = m.status()
        assert status.state == RenewalState.RETRYING.value
        assert "UNAVAILABLE" in str(status.last_error)
        assert status.next_attempt_in <= 0.6
        assert m.current(SLEEP) is svid  # the last good certificate is still served

    run_with_manager(manager, body)
