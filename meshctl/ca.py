"""`meshctl ca root` and `meshctl ca check CERT.pem`: the mesh root, and what a certificate is;
`meshctl ca status`, `rotate-token-key` and `rotate-root`: the control plane's token key and roots.

The mesh root is found, in order: `--root FILE`; `$MESH_CA_DIR/root-cert.pem`; the local cluster's
control plane state, `<cluster state dir>/controlplane/ca/root-cert.pem`.  It may hold two roots while
the root is rotated.

Rotations are asked of the control plane (its apply API), which runs them without a restart:
`rotate-token-key --overlap D` makes a new token signing key, and tokens of the old one are refused after
D (at once with 0s: every token it signed is revoked; the local cluster gives its holders new tokens
within a second); `rotate-root --propagation P --overlap D` trusts a new root at once, signs with it after
P, and drops the old root D later.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh.api.schema import parse_duration
from mesh.errors import MeshError, UsageError
from meshctl.config import add_connection_args, client_from

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
    """The certificates in `path` (PEM, several; or DER); `-` is standard input."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise CACommandError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if not data.strip():
        raise CACommandError(f"{'standard input' if str(path) == '-' else path}: empty: no {what} in it")
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


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 0s, 90s, 10m or 1h") from None


def cmd_status(args: argparse.Namespace) -> int:
    client = client_from(args)
    key, roots = client.token_key_status(), client.root_status()
    print(f"token key: {key['current']} ({key['algorithm']}, current since {key['since']})")
    for r in key["retiring"]:
        print(f"  retiring: {r['kid']}, accepted until {r['until']}")
    phase = roots["phase"]
    when = {"propagating": f", the new root signs from {roots.get('activateAt')}",
            "overlap": f", the old root is trusted until {roots.get('retireAt')}"}.get(phase, "")
    print(f"root rotation: {phase}{when}")
    for r in roots["roots"]:
        signing = " (signs)" if r["sha256"] == roots["signingRoot"] else ""
        print(f"  root {r['sha256'][:16]} {r['subject']}, valid until {r['notAfter']}{signing}")
    return 0


def cmd_rotate_token_key(args: argparse.Namespace) -> int:
    if args.overlap is None:
        raise UsageError("rotate-token-key needs --overlap: how long tokens of the current key stay good "
                         "(0s revokes them now)")
    status = client_from(args).rotate_token_key(args.overlap)
    print(f"token key rotated: {status['current']} signs new tokens")
    for r in status["retiring"]:
        print(f"the previous key {r['kid']} is accepted until {r['until']}")
    if not status["retiring"]:
        print("tokens signed by the previous key are refused from now on")
    return 0


def cmd_rotate_root(args: argparse.Namespace) -> int:
    status = client_from(args).rotate_root(args.propagation, args.overlap)
    print(f"root rotation started: the new root is trusted now, signs from {status.get('activateAt')}, "
          f"and the old root is dropped at {status.get('retireAt')} (meshctl ca status)")
    return 0


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
    check.add_argument("cert", metavar="CERT.pem", help="the certificate file, or - for standard input, e.g. "
                       "`meshctl agent certs node-1 --chain bookinfo/sleep | meshctl ca check -` (a pod's chain "
                       "as its node agent holds it)")
    common(check)
    check.set_defaults(func=cmd_check)

    status = verbs.add_parser("status", help="the token signing key and the roots, and any rotation under way")
    add_connection_args(status)
    status.set_defaults(func=cmd_status)

    token_key = verbs.add_parser(
        "rotate-token-key", help="make a new token signing key; the old one is refused after the overlap",
        description="Make a new signing key for the tokens the control plane mints. Tokens signed by the "
        "current key stay good for --overlap, then are refused: rotating the key revokes them. The local "
        "cluster gives node agents and waypoints new tokens at once.")
    token_key.add_argument("--overlap", type=_duration, metavar="DURATION",
                           help="how long the old key's tokens are still accepted, e.g. 1h; 0s revokes them now")
    add_connection_args(token_key)
    token_key.set_defaults(func=cmd_rotate_token_key)

    root = verbs.add_parser(
        "rotate-root", help="replace the CA root without a restart (trust both, switch, drop the old)",
        description="Replace the CA's root while everything runs: the new root is added to the trust bundle "
        "now, signs every new certificate after --propagation (node agents and waypoints renew theirs at "
        "once), and the old root leaves the bundle --overlap later.")
    root.add_argument("--propagation", type=_duration, default=60.0, metavar="DURATION",
                      help="how long every process gets to read the new bundle before the new root signs "
                           "(default 60s)")
    root.add_argument("--overlap", type=_duration, default=3600.0, metavar="DURATION",
                      help="how long the old root is still trusted after the new one signs (default 1h)")
    add_connection_args(root)
    root.set_defaults(func=cmd_rotate_root)
