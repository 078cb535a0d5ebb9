"""Keep one HTTP/1.1 connection open and send a GET every INTERVAL seconds for DURATION seconds.

    python long_connection.py HOST PORT PATH DURATION INTERVAL  -> {"ok": n, "failed": n, "error": ...}
"""

import http.client
import json
import sys
import time

host, port, path, duration, interval = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
conn = http.client.HTTPConnection(host, port, timeout=10)
ok = failed = 0
error = ""
local = None
deadline = time.monotonic() + duration
while time.monotonic() < deadline:
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        if local is None:
            local = conn.sock.getsockname()
        elif conn.sock.getsockname() != local:
            raise RuntimeError("the connection was replaced")
        ok += resp.status == 200
        failed += resp.status != 200
    except Exception as exc:  # noqa: BLE001
        failed += 1
        error = repr(exc)
        break
    time.sleep(interval)
print(json.dumps({"ok": ok, "failed": failed, "error": error}))
