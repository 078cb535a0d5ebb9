"""Running a command inside a pod's network namespace (`nsenter --net=PATH`), as the capture does for
iptables and ip: the one place that turns what such a command can go through into `RedirectError`."""

from __future__ import annotations

import subprocess

from nodeagent.errors import RedirectError

TIMEOUT = 30.0
PACKAGE = {"iptables-restore": "iptables", "iptables-save": "iptables", "ip": "iproute2"}


def run_in(netns_path: str, argv: list[str], stdin: str | None = None, *, ok_errors: tuple[str, ...] = ()) -> str:
    """Run `argv` in the namespace at `netns_path`; its output.  A failure whose message contains one of
    `ok_errors` gives an empty output instead (e.g. "FIB table does not exist": nothing to list)."""
    cmd = ["nsenter", f"--net={netns_path}", *argv]
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise RedirectError(f"{argv[0]} is not installed on this node: install {PACKAGE.get(argv[0], argv[0])}"
                            ) from exc
    except subprocess.TimeoutExpired as exc:
        raise RedirectError(f"{argv[0]} in {netns_path} did not finish in {TIMEOUT:g}s: is the xtables lock "
                            "held?") from exc
    if out.returncode != 0:
        if any(e in out.stderr for e in ok_errors):
            return ""
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise RedirectError(f"{' '.join(argv)} in {netns_path} failed: {detail[-1] if detail else out.returncode}")
    return out.stdout
