"""Giving memory back: when the trimmer trims (the policy), that a trim really returns freed heap to the
system, and the flag (with its bad values)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from nodeagent import memory
from nodeagent.main import parse_args
from nodeagent.memory import Trimmer, TrimPolicy


def test_the_policy_trims_once_the_connections_have_fallen_a_lot_since_the_last_trim() -> None:
    policy = TrimPolicy(min_drop=100, drop_fraction=0.5, spacing=0)
    assert [policy.look(n, 0) for n in (0, 50, 400, 390, 300)] == [False] * 5  # rising, then a small dip
    assert policy.look(150, 0) is True  # 250 fewer than the peak of 400: more than 100 and than half of it
    assert policy.peak == 150
    assert [policy.look(n, 0) for n in (100, 60)] == [False, False]  # under min_drop since the trim
    assert policy.look(40, 0) is True
    assert policy.look(10_000, 0) is False and policy.look(4_000, 0) is True


def test_trims_are_spaced() -> None:
    policy = TrimPolicy(min_drop=10, spacing=60)
    assert policy.look(1_000, 0) is False and policy.look(0, 1) is True
    assert policy.look(500, 2) is False and policy.look(0, 30) is False  # a drop, but too soon
    assert policy.look(0, 61) is True  # the drop is still there once the spacing has passed


def test_a_steady_load_is_never_trimmed() -> None:
    policy = TrimPolicy()
    assert not any(policy.look(n, t) for t, n in enumerate([5_000, 4_900, 5_100, 4_800] * 25))


FRAGMENTED_HEAP = """
import ctypes, json
from nodeagent import memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks, pins = [], []
for _ in range(1024):  # 64 MiB of heap (blocks under mmap's threshold), each followed by a small pin, so
    blocks.append(libc.malloc(64 * 1024 - 64))  # that the freed blocks cannot merge into the heap's top
    pins.append(libc.malloc(64))  # and free() alone gives nothing back
    ctypes.memset(blocks[-1], 1, 64 * 1024 - 64)
for p in blocks:
    libc.free(p)
before = memory.resident_kib()
trimmed = memory.trim()
print(json.dumps({"trimmed": trimmed, "before": before, "after": memory.resident_kib()}))
"""


def test_a_trim_returns_freed_heap_to_the_system() -> None:
    # In a process of its own: the heap's layout is then known (this one's has had many tests in it).
    out = json.loads(subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["trimmed"] is True
    assert out["before"] - out["after"] > 32 * 1024, out  # most of the 64 MiB went back


def test_the_trimmer_looks_at_the_connections_and_trims_after_a_drop() -> None:
    counts = iter([2_000, 2_000, 100, 100])

    async def count() -> int:
        return next(counts)

    async def main() -> list[bool]:
        trimmer = Trimmer(count, interval=0.01, policy=TrimPolicy(spacing=0))
        return [await trimmer.look() for _ in range(4)]

    assert trio.run(main) == [False, False, True, False]


def test_a_failing_look_is_logged_and_the_trimmer_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    looks = 0

    async def count() -> int:
        nonlocal looks
        looks += 1
        raise RuntimeError("engine gone")

    async def main() -> None:
        with trio.move_on_after(1.0):
            await Trimmer(count, interval=0.01).run()

    trio.run(main)
    assert looks > 1 and "looking whether to give memory back failed: engine gone" in caplog.text


def test_an_interval_of_zero_never_looks() -> None:
    async def count() -> int:
        raise AssertionError("looked")

    trio.run(Trimmer(count, interval=0).run)


def _args(tmp_path: Path, *extra: str) -> list[str]:
    cert = tmp_path / "root.pem"
    cert.write_text("x")
    return ["--node", "n1", "--pod-netns", "/run/netns/{name}", "--control-plane", "127.0.0.1:15012",
            "--root-cert", str(cert), "--token-file", str(cert), *extra]


def test_the_trim_interval_flag(tmp_path: Path) -> None:
    assert parse_args(_args(tmp_path)).memory_trim_interval == memory.TRIM_INTERVAL
    assert parse_args(_args(tmp_path, "--memory-trim-interval", "0")).memory_trim_interval == 0.0


@pytest.mark.parametrize(("extra", "message"), [
    (("--memory-trim-interval", "-5"), "--memory-trim-interval must not be negative"),
    (("--memory-trim-interval", "soon"), "invalid float value: 'soon'"),
])
def test_a_bad_trim_interval_says_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(_args(tmp_path, *extra))
    assert message in capsys.readouterr().err
