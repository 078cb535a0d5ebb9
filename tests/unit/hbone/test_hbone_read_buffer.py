"""The HBONE connection's TLS reads land in one buffer per thread and are copied out at once.

uvloop hands a `BufferedProtocol` its own buffer to decrypt into, instead of allocating 256 KiB per
read (`mesh.hbone.aio.read_buffer`).  The buffer is reused by the next read of any connection on the
same loop, so what the core gets must not be a view of it; and two loops' threads never share one."""

from __future__ import annotations

import asyncio
import threading

from mesh.hbone.aio import READ_BUFFER, AioHbone, read_buffer
from mesh.hbone.config import HboneConfig
from mesh.hbone.sides import HboneServer


def connection(loop: asyncio.AbstractEventLoop) -> tuple[AioHbone, list[bytes]]:
    conn = AioHbone(HboneServer(HboneConfig(), now=loop.time()), loop)
    conn.connection_made(asyncio.Transport())  # (on this thread: the buffer is taken here)
    got: list[bytes] = []
    conn.data_received = got.append  # type: ignore[method-assign]  # what the core would be fed
    return conn, got


def test_what_was_read_is_copied_out_before_the_buffer_is_reused() -> None:
    loop = asyncio.new_event_loop()
    try:
        first, got_first = connection(loop)
        second, got_second = connection(loop)
        buf = first.get_buffer(1024 + 256)
        assert len(buf) == READ_BUFFER and second.get_buffer(10) is buf  # one buffer for the thread
        buf[:5] = b"hello"
        first.buffer_updated(5)
        buf[:5] = b"XXXXX"  # the next read, another connection's
        second.buffer_updated(3)
        assert got_first == [b"hello"] and got_second == [b"XXX"]
        assert all(type(data) is bytes for data in got_first + got_second)
    finally:
        loop.close()


def test_each_thread_reads_into_its_own_buffer() -> None:
    mine = read_buffer()
    theirs: list[memoryview] = []
    thread = threading.Thread(target=lambda: theirs.append(read_buffer()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and theirs[0].obj is not mine.obj
    assert read_buffer() is mine  # made once per thread
