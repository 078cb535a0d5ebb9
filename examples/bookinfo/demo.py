"""`make demo`: bring up the bookinfo cluster, call productpage from the client pod, show who answered;
then put the bookinfo namespace in the mesh, live, and show the same calls carried over mutual TLS.

It runs the real `meshctl` (as a user would), calls `GET http://productpage:9080/productpage` from the
`sleep` pod 20 times, prints which productpage, reviews and ratings pods answered and on which node,
labels the namespace `istio.io/dataplane-mode=ambient`, calls again, prints what the node agents saw
(identities, mTLS), then takes one L7 step through a waypoint (the samples' waypoint, subsets and a 70/30
split of reviews between v1 and v3) and shows the split it measured, prints `meshctl cluster status`,
starts `meshctl dashboard` in the background and ends with its address, and leaves the cluster running.
A bookinfo cluster that is already up is replaced, after a warning (and a question, on a terminal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "cluster.yaml"
SAMPLES = HERE / "samples"
CALLS = 20
SPLIT_CALLS = 60  # the L7 step's calls: enough to see a 70/30 split
OTLP_ENDPOINT = "http://172.30.0.1:4318/v1/traces"  # the underlay's gateway (the cluster file's default underlay)
STATE = Path(os.environ.get("MESH_STATE_DIR") or "/run/ambient-mesh")


def meshctl(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshctl.main", *args], text=True, check=False,
                          capture_output=capture, cwd=HERE.parents[1])


def call_productpage() -> dict | str:
    out = meshctl("exec", "--cluster", "bookinfo", "-n", "bookinfo", "sleep", "--", "curl", "-sS", "-m", "5",
                  "-H", "end-user: demo", "http://productpage:9080/productpage", capture=True)
    if out.returncode != 0:
        return (out.stderr or out.stdout).strip()
    try:
        answer: dict = json.loads(out.stdout)
    except ValueError:
        return f"not JSON: {out.stdout[:80]!r}"
    return answer


def call_many(title: str) -> int:
    print(f"\n{title}: calling http://productpage:9080/productpage from bookinfo/sleep {CALLS} times\n")
    print(f"{'#':>3}  {'productpage':<24} {'details':<20} {'reviews':<24} ratings")
    versions: Counter[str] = Counter()
    failures = 0
    for i in range(1, CALLS + 1):
        answer = call_productpage()
        if isinstance(answer, str):
            failures += 1
            print(f"{i:>3}  error: {answer}")
            continue
        reviews, details = answer.get("reviews", {}), answer.get("details", {})
        ratings = reviews.get("ratings")
        versions[f"reviews {reviews.get('version')} on {reviews.get('node')}"] += 1
        print(f"{i:>3}  {answer['pod'] + '@' + answer['node']:<24} "
              f"{details.get('pod', '?') + '@' + details.get('node', '?'):<20} "
              f"{reviews.get('pod', '?') + '@' + reviews.get('node', '?'):<24} "
              f"{(ratings['pod'] + '@' + ratings['node']) if ratings else '(v1 calls no ratings)'}")
    print("\nwho answered for reviews:")
    for key, count in sorted(versions.items()):
        print(f"  {key}: {count}")
    if failures:
        print(f"  {failures} calls failed")
    return failures


def enrolled() -> set[str]:
    names = set()
    for node in ("node-1", "node-2"):
        out = meshctl("agent", "workloads", node, "--cluster", "bookinfo", "-o", "json", capture=True)
        if out.returncode == 0:
            names |= {w["name"] for w in json.loads(out.stdout)["workloads"]
                      if w.get("local") and w.get("enrollment") == "enrolled" and w["namespace"] == "bookinfo"}
    return names


def what_the_agents_saw() -> None:
    state = STATE / "bookinfo" / "logs"
    seen: Counter[tuple[str, str, str]] = Counter()
    for node in ("node-1", "node-2"):
        for line in (state / f"nodeagent.{node}.log").read_text().splitlines():
            if line.startswith('{"time"') and '"direction":"inbound"' in line:
                e = json.loads(line)
                seen[(e["source_principal"], e["destination_workload"], e["connection_security_policy"])] += 1
    print("\nwhat the destination node agents saw (from their access logs):")
    for (src, dst, security), count in sorted(seen.items()):
        print(f"  {count:>3} x {src} -> {dst} ({security})")


def may_replace() -> bool:
    """Warn when a bookinfo cluster is up (the demo replaces it); on a terminal, ask first."""
    listed = meshctl("cluster", "list", capture=True).stdout.splitlines()[1:]
    if not any("bookinfo" in line.split() for line in listed):
        return True
    print("warning: a cluster named bookinfo is up; the demo removes it and builds a new one "
          "(whatever was applied to it is lost)")
    if not sys.stdin.isatty():
        print("(not on a terminal: replacing it)")
        return True
    answer = input("replace it? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        print("left as it is; remove it yourself with: .venv/bin/meshctl cluster down bookinfo")
        return False
    return True


def reviews_split(calls: int, cluster: str = "bookinfo") -> tuple[Counter[str], int]:
    """Which reviews version answered each of `calls` calls to productpage (made in one shell in the sleep
    pod), and how many calls failed."""
    loop = (f"for i in $(seq {calls}); do curl -sS -m 5 -H 'end-user: demo' http://productpage:9080/productpage; "
            "echo; done")
    out = meshctl("exec", "--cluster", cluster, "-n", "bookinfo", "sleep", "--", "sh", "-c", loop, capture=True)
    versions: Counter[str] = Counter()
    for line in out.stdout.splitlines():
        try:
            versions[str(json.loads(line)["reviews"]["version"])] += 1
        except (ValueError, KeyError, TypeError):
            continue  # an error's text, or the line break after an answer: counted as missing below
    return versions, calls - sum(versions.values())


def l7_step(cluster: str = "bookinfo") -> tuple[Counter[str], int]:
    """Route reviews 70/30 between v1 and v3 at a waypoint, and show the split the calls saw: which version
    answered how many calls, and how many failed."""
    print("\nan L7 step: a waypoint for bookinfo, then reviews split 70/30 between v1 and v3 "
          "(examples/bookinfo/samples/)")
    steps = [("apply", "-f", str(SAMPLES / "waypoint" / "waypoint.yaml")),
             ("label", "namespace", "bookinfo", "istio.io/use-waypoint=waypoint"),
             ("apply", "-f", str(SAMPLES / "networking" / "destination-rule-all.yaml")),
             ("apply", "-f", str(SAMPLES / "networking" / "virtual-service-reviews-v1-v3.yaml"))]
    for step in steps:
        print(f"  meshctl {' '.join(step).replace(str(HERE.parents[1]) + '/', '')}")
        done = meshctl(*step, "--cluster", cluster, capture=True)
        if done.returncode != 0:
            print(f"    failed: {(done.stderr or done.stdout).strip()}")
            return Counter(), 1
    # The waypoint starts, the agents learn to send reviews' traffic through it, and it learns the route:
    # until then v2 answers too.  Wait (up to 30 s) until a few calls see only v1 and v3.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        versions, failed = reviews_split(10, cluster)
        if not failed and set(versions) <= {"v1", "v3"}:
            break
        time.sleep(1)
    versions, failed = reviews_split(SPLIT_CALLS, cluster)
    print(f"\n{SPLIT_CALLS} calls through the waypoint; reviews answered by:")
    for version, count in sorted(versions.items()):
        print(f"  {version}: {count:>3} ({100 * count / SPLIT_CALLS:.0f}%)")
    if failed:
        print(f"  {failed} calls failed")
    return versions, failed


def main() -> int:
    if not may_replace():
        return 1
    meshctl("cluster", "down", "bookinfo", capture=True)
    # Spans go to the underlay's gateway, where `meshctl dashboard` receives them (it is the collector).
    if meshctl("cluster", "up", "-f", str(CLUSTER_FILE), "--otlp-endpoint", OTLP_ENDPOINT).returncode != 0:
        return 1
    failures = call_many("without the mesh")
    print("\nputting the bookinfo namespace in the mesh: meshctl label namespace bookinfo "
          "istio.io/dataplane-mode=ambient")
    meshctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient", "--cluster", "bookinfo")
    deadline = time.monotonic() + 30
    while len(enrolled()) < 7 and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"enrolled by the node agents, without restarting them: {', '.join(sorted(enrolled()))}")
    failures += call_many("through the mesh")
    what_the_agents_saw()
    failures += l7_step()[1]
    print()
    meshctl("cluster", "status", "bookinfo")
    print("\nthe cluster is still running; try:\n"
          "  .venv/bin/meshctl exec -n bookinfo sleep -- curl -s http://productpage:9080/productpage\n"
          "  .venv/bin/meshctl agent workloads node-1\n"
          "  .venv/bin/meshctl proxy-status\n"
          "  .venv/bin/meshctl logs -n bookinfo waypoint                        # the waypoint's log\n"
          "  .venv/bin/meshctl apply -f examples/bookinfo/samples/...           # more routes and policies\n"
          "  .venv/bin/meshctl apply -f examples/bookinfo/tracing.yaml        # sample every request\n"
          "remove it with:\n"
          "  .venv/bin/meshctl cluster down bookinfo")
    dashboard = meshctl("dashboard", "--cluster", "bookinfo", "--detach", capture=True)
    if dashboard.returncode != 0:
        print(f"\nthe dashboard did not start: {(dashboard.stderr or dashboard.stdout).strip()}")
        return 1
    url = json.loads((STATE / "bookinfo" / "dashboard.json").read_text())["url"]
    print(f"\nthe dashboard (service graph, workloads, traces, mesh health; stops with the cluster): {url}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
