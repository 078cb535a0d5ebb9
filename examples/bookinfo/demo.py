"""`make demo`: bring up the bookinfo cluster, call productpage from the client pod, show who answered.

It runs the real `meshctl` (as a user would), calls `GET http://productpage:9080/productpage` from the
`sleep` pod 20 times, prints which productpage, reviews and ratings pods answered and on which node,
prints `meshctl cluster status`, and leaves the cluster running with the command that removes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLUSTER_FILE = HERE / "cluster.yaml"
CALLS = 20


def meshctl(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli.main", *args], text=True, check=False,
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


def main() -> int:
    meshctl("cluster", "down", "bookinfo", capture=True)
    if meshctl("cluster", "up", "-f", str(CLUSTER_FILE)).returncode != 0:
        return 1
    print(f"\ncalling http://productpage:9080/productpage from bookinfo/sleep {CALLS} times:\n")
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
    print()
    meshctl("cluster", "status", "bookinfo")
    print("\nthe cluster is still running; try:\n"
          "  .venv/bin/meshctl exec -n bookinfo sleep -- curl -s http://productpage:9080/productpage\n"
          "remove it with:\n"
          "  .venv/bin/meshctl cluster down bookinfo")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
