"""A process that stops on bad input says so in one line, even when the error came from a task of a
nursery (trio wraps it in an exception group)."""

from __future__ import annotations

import logging

import pytest
import trio

from mesh.errors import MeshError
from mesh.process import serve_until_signalled


def test_a_mesh_error_in_a_nursery_task_is_one_line_and_exit_1(caplog: pytest.LogCaptureFixture) -> None:
    async def body(stop: trio.Event) -> None:
        async def fail() -> None:
            raise MeshError("eBPF redirection is unavailable: no cgroup v2; use --redirect-mode iptables")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            await trio.sleep_forever()

    with caplog.at_level(logging.ERROR):
        assert serve_until_signalled(body, logging.getLogger("t"), "stopping") == 1
    assert [r.getMessage() for r in caplog.records] == [
        "eBPF redirection is unavailable: no cgroup v2; use --redirect-mode iptables"]


def test_a_bug_is_not_swallowed() -> None:
    async def body(stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            raise KeyError("bug")

    with pytest.raises(BaseExceptionGroup):
        serve_until_signalled(body, logging.getLogger("t"), "stopping")
