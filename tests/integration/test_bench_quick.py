"""`meshctl bench` end to end, as CI runs it once: a tiny setting of every mode on a real bench cluster.

Checks that the JSON, Markdown and PNG are written, that every mode either ran without errors or says
why it is unavailable, that the figures are there for the modes that ran (new connections and the first
connection in every mode, the scale phase's idle tunnels in b and e, the L4 floor's tcp_proxy pair), and that nothing of the bench
cluster is left, also after the run is interrupted with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Meshctl, leftovers

pytestmark = pytest.mark.root


def test_bench_quick_writes_results_and_cleans_up(meshctl: Meshctl, tmp_path: Path) -> None:
    name = f"t-bench-{os.getpid() % 100000}"  # unique: namespaces are machine-wide, test runs may overlap
    out = meshctl("bench", "--quick", "--duration", "2", "--stream-mib", "4", "--scale-tunnels", "300",
                  "--cluster-name", name, "--output", str(tmp_path), check=False, timeout=400)
    assert out.returncode == 0, f"meshctl bench exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    assert "[round 1/1] mode a (no mesh): open" in out.stdout
    files = {p.suffix: p for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert set(files) == {".json", ".md", ".png"}
    assert files[".png"].read_bytes()[:4] == b"\x89PNG"
    results = json.loads(files[".json"].read_text())
    modes = results["modes"]
    assert set(modes) == {"a", "b", "c", "d", "e", "f"}
    # Every mode runs for real: no mesh, the node agents, the waypoint, the Envoy pair, the node agents
    # capturing with eBPF, and the Envoy pair as tcp_proxies (the L4 floor).
    assert {key: info["status"] for key, info in modes.items()} == {m: "ok" for m in "abcdef"}
    for key in modes:
        ran = [r for r in results["rounds"] if r["mode"] == key]
        assert ran and all(r["error_count"] == 0 for r in ran), (key, ran[0].get("errors") if ran else None)
        phases = ran[0]["phases"]
        assert phases["open"]["completed"] >= 1900 and phases["saturation"]["requests_per_s"] > 0
        assert phases["stream"]["mb_per_s"] > 0
        assert results["summary"][key]["open"]["p99"] > 0
        # a new connection for every request, 200/s for 2 s, through the mode's path
        assert phases["newconn200"]["completed"] == 400 and phases["newconn200"]["error_count"] == 0
        assert results["summary"][key]["newconn"]["newconn200"]["p99"] > 0
        assert ran[0]["first_connection"]["latency_us"] > 0, ran[0]["first_connection"]
        if key in "be":  # the node agents held 300 idle tunnels at once, and their memory was read around it
            sc = phases["scale"]
            assert sc["opened"] == 300 and sc["error_count"] == 0, sc
            assert set(sc["rss_held_kib"]) == {"nodeagent node-1", "nodeagent node-2"}
            assert all(v > 0 for v in sc["rss_idle_kib"].values())
            # and before any load, once the mode's capture was in place
            assert set(ran[0]["rss_fresh_kib"]) == {"nodeagent node-1", "nodeagent node-2"}
            assert all(v > 0 for v in ran[0]["rss_fresh_kib"].values())
            assert results["summary"][key]["scale"]["tunnels"] == 300
            # on enrollment, the client's node agent opened the HBONE connection to the server ahead of time
            assert (ran[0]["first_connection"]["prewarmed"] or {}).get("dialled") == 1, ran[0]["first_connection"]
        else:
            assert "scale" not in phases
    if "d" in modes and "b" in modes:
        assert results["summary"]["b"]["newconn"]["newconn200"]["cpu_per_1k"] > 0
    assert re.search(r"\d+\.\d+\.\d+", results["meta"]["envoy"]), results["meta"]["envoy"]  # Envoy's version
    d = next(r for r in results["rounds"] if r["mode"] == "d")
    assert d["path"].startswith("client and server Envoys forwarded")
    assert set(d["peak_rss_kib"]) == {"envoy client", "envoy server"}
    f = next(r for r in results["rounds"] if r["mode"] == "f")
    assert f["path"].startswith("client and server Envoys (tcp_proxy) carried")
    assert set(f["peak_rss_kib"]) == {"envoy client", "envoy server"}
    e = next(r for r in results["rounds"] if r["mode"] == "e")
    assert "eBPF programs and no iptables rules" in e["path"]
    md = files[".md"].read_text()
    assert "| a: no mesh | ok |" in md and "| d: sidecar model (Envoy) | ok |" in md
    assert "| f: L4 floor (Envoy tcp_proxy) | ok |" in md
    assert "## New connections" in md and "## Scale: idle tunnels held at once" in md
    assert leftovers(name) == []


def test_bench_interrupted_removes_its_cluster(meshctl: Meshctl, tmp_path: Path) -> None:
    name = f"t-benchint-{os.getpid() % 100000}"
    proc = meshctl.popen("bench", "--quick", "--modes", "a", "--duration", "30", "--cluster-name", name,
                         "--output", str(tmp_path))
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    seen = ""
    for line in proc.stdout:
        seen += line
        if "mode a (no mesh): open" in line or time.monotonic() > deadline:
            break
    assert "mode a (no mesh): open" in seen, seen
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + rest
    assert f"bench cluster {name!r} removed" in rest
    assert leftovers(name) == []
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
