"""Open N connections at once to HOST:PORT, echo a line on each while all are open, then close.

    python many_connections.py HOST PORT N      -> prints {"ok": n, "failed": n, "errors": [...]}
"""

import asyncio
import json
import resource
import sys


async def one(host: str, port: int, i: int, opened: asyncio.Barrier) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        await opened.wait()
        return f"connect: {exc!r}"
    try:
        await opened.wait()  # every connection is open before any is used
        line = f"ping {i}\n".encode()
        writer.write(line)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(line)), 30)
        return None if got == line else f"echo mismatch on {i}"
    except Exception as exc:  # noqa: BLE001
        return f"echo: {exc!r}"
    finally:
        writer.close()


async def main(host: str, port: int, n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opened = asyncio.Barrier(n)
    results = await asyncio.gather(*(one(host, port, i, opened) for i in range(n)))
    errors = [r for r in results if r]
    print(json.dumps({"ok": n - len(errors), "failed": len(errors), "errors": errors[:5]}))


asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
