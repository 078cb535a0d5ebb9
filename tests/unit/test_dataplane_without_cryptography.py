"""The node agent reads certificates and makes keys and CSRs without the `cryptography` package
(`mesh.secrets.x509`, `mesh.secrets.openssl`): importing it in a fresh interpreter must not load it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import nodeagent.app
from mesh.secrets.svid import generate_key, make_csr
from mesh.identity import SpiffeId
make_csr(generate_key(), SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"))
loaded = sorted(m for m in sys.modules if m == "cryptography" or m.startswith("cryptography."))
print(" ".join(loaded) or "none")
"""


def test_the_node_agent_does_not_import_cryptography() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none", f"the node agent imported {out.stdout.strip()}"
