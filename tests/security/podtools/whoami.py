"""A TCP server for tests: `python whoami.py PORT`.  Says who it sees as its peer ("ip:port\n"), then
echoes.  Standard library only."""

import asyncio
import sys


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host, port = writer.get_extra_info("peername")[:2]
    try:
        writer.write(f"{host}:{port}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "0.0.0.0", port)
    print(f"whoami listening on :{port}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main(int(sys.argv[1])))
