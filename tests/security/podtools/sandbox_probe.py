"""What a pod may do, seen from inside it: `python sandbox_probe.py PATH...` prints one JSON object.

    uid, gid, groups     who it runs as
    status               CapInh/CapPrm/CapEff/CapBnd/CapAmb/NoNewPrivs from /proc/self/status
    so_mark              setsockopt(SO_MARK, 0x539): "ok" or the errno's name
    iptables_flush       `iptables -t nat -F`: its exit status and last line of output
    paths                for each PATH: "readable", "unreadable" (it exists, but may not be read) or "absent"
    listing              for each PATH that is a directory it can list: its entries

Standard library only (it runs with whatever interpreter the pod has).
"""

import errno
import json
import os
import socket
import subprocess
import sys

SO_MARK = 36


def status() -> dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
                out[key] = value.strip()
    return out


def so_mark() -> str:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, 0x539)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def iptables_flush() -> dict[str, object]:
    try:
        done = subprocess.run(["iptables", "-t", "nat", "-F"], capture_output=True, text=True, timeout=20)
    except OSError as exc:
        return {"status": -1, "output": str(exc)}
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"status": done.returncode, "output": lines[-1] if lines else ""}


def path_state(path: str) -> str:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except FileNotFoundError:
        return "absent"
    except PermissionError:
        return "unreadable"
    return "readable"


def listing(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "status": status(), "so_mark": so_mark(),
    "iptables_flush": iptables_flush(), "paths": {p: path_state(p) for p in sys.argv[1:]},
    "listing": {p: listing(p) for p in sys.argv[1:] if os.path.isdir(p)},
}))
