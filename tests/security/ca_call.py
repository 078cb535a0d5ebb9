"""One CreateCertificate call, as a test's probe from inside a node's network namespace:

    python -m tests.security.ca_call HOST:PORT ROOT_CERT TOKEN_FILE SPIFFE_ID [IMPERSONATE]

prints `ok <root sha256>` (the fingerprint of the root the answer's chain ends in) or `<gRPC code> <details>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mesh.identity import SpiffeId
from mesh.secrets.client import CAClient
from mesh.secrets.errors import CertificateRequestError
from mesh.secrets.svid import generate_key, make_csr


def main(argv: list[str]) -> int:
    target, root, token_file, identity = argv[:4]
    impersonate = len(argv) > 4
    ident = SpiffeId.parse(identity)
    with CAClient(target, Path(root).read_bytes(), Path(token_file).read_text().strip(), timeout=10) as client:
        try:
            chain = client.create_certificate(make_csr(generate_key(), ident), impersonate=ident if impersonate else None)
        except CertificateRequestError as exc:
            print(f"{exc.code} {exc}")
            return 1
    print("ok", x509.load_pem_x509_certificate(chain[-1].encode()).fingerprint(hashes.SHA256()).hex())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
