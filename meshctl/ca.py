"""`meshctl ca root` and `meshctl ca check CERT.pem`: the mesh root, and what a certificate is.

The mesh root is found, in order: `--root FILE`; `$MESH_CA_DIR/root-cert.pem`; the local cluster's
control plane state, `<cluster state dir>/controlplane/ca/root-cert.pem`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh.errors import MeshError

ROOT_CERT = "root-cert.pem"
CA_DIR_ENV = "MESH_CA_DIR"
CLUSTER_CA_SUBDIR = Path("controlplane") / "ca"


class CACommandError(MeshError):
    """`meshctl ca` could not find or read a certificate."""


def find_root(root: str | None, cluster: str | None) -> Path:
    """Where the mesh root certificate is (see the module docstring)."""
    if root:
        return Path(root)
    ca_dir = os.environ.get(CA_DIR_ENV)
    if ca_dir:
        return Path(ca_dir) / ROOT_CERT
    try:
        from localcluster.state import cluster_dir, find_cluster
    except ImportError:  # pragma: no cover - the cluster package is always there in a full install
        raise CACommandError(f"no mesh root: pass --root FILE or set {CA_DIR_ENV}") from None
    try:
        name = find_cluster(cluster)
    except MeshError as exc:
        raise CACommandError(f"no mesh root: {exc} (or pass --root FILE, or set {CA_DIR_ENV})") from None
    return cluster_dir(name) / CLUSTER_CA_SUBDIR / ROOT_CERT


def read_certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CACommandError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise CACommandError(f"{path}: not a PEM or DER certificate") from None
    return certs


def cmd_root(args: argparse.Namespace) -> int:
    path = find_root(args.root, args.cluster)
    certs = read_certs(path, "mesh root certificate")
    from ca.authority import to_pem

    sys.stdout.write("".join(to_pem(c) for c in certs))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ca.inspect import explain

    certs = read_certs(Path(args.cert), "certificate")
    roots: list[x509.Certificate] | None
    try:
        root_path = find_root(args.root, args.cluster)
        roots = read_certs(root_path, "mesh root certificate")
        source, missing = str(root_path), None
    except CACommandError as exc:
        roots, source, missing = None, "the mesh root", str(exc)
    explanation = explain(certs, roots, root_source=source, roots_missing_reason=missing)
    print(f"certificate: {args.cert}")
    print(explanation.render())
    return 0 if explanation.ok else 1


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "ca",
        help="the mesh certificate authority: show the root, explain a certificate",
        description="Inspect the mesh CA. " + (__doc__ or "").split("\n\n", 1)[1].strip(),
    )
    verbs = parser.add_subparsers(dest="ca_verb", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--root",
            metavar="FILE",
            help=f"the mesh root certificate (PEM); default ${CA_DIR_ENV}/{ROOT_CERT}, "
            f"else the local cluster's {CLUSTER_CA_SUBDIR / ROOT_CERT}",
        )
        p.add_argument("--cluster", metavar="NAME", help="the local cluster whose root to use")

    root = verbs.add_parser("root", help="print the mesh root certificate (PEM)")
    common(root)
    root.set_defaults(func=cmd_root)

    check = verbs.add_parser(
        "check",
        help="explain a certificate: identity, issuer, validity, chain to the mesh root",
        description="Explain CERT (PEM, possibly with its chain; or DER): its identity, issuer, validity, "
        "and chain to the mesh root. Exits 1 if it is not a valid mesh certificate now.",
    )
    check.add_argument("cert", metavar="CERT.pem")
    common(check)
    check.set_defaults(func=cmd_check)
