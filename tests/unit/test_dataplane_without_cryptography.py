"""The node agent reads certificates and makes keys and CSRs without the `cryptography` package
(`mesh.secrets.x509`, `mesh.secrets.openssl`): importing it in a fresh interpreter must not load it.  The
waypoint loads it (through PyJWT) only when it compiles a JWT rule."""

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


WAYPOINT_PROBE = """
import json, sys
import waypoint.app, waypoint.main
from waypoint.l7.jwt import compile_rules
def loaded():
    return " ".join(sorted(m for m in ("cryptography", "jwt") if m in sys.modules)) or "none"
print(loaded())
print(compile_rules("RequestAuthentication a/none", "a", "none", {}, ()), loaded())
jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
                  "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                  "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}
spec = {"jwtRules": [{"issuer": "i", "jwks": json.dumps(jwks)}]}
print(len(compile_rules("RequestAuthentication a/jwt", "a", "jwt", spec, ())), loaded())
"""


def test_the_waypoint_imports_cryptography_only_with_its_first_jwt_rule() -> None:
    # PyJWT brings `cryptography` (~19 MiB of an idle waypoint); a waypoint without RequestAuthentication
    # never loads either, and one with a JWT rule loads them when the rule is compiled, not on a request
    out = subprocess.run([sys.executable, "-c", WAYPOINT_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["none", "() none", "1 cryptography jwt"], out.stdout
