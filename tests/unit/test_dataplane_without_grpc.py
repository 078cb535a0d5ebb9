"""The node agent and the waypoint talk gRPC to the control plane over `mesh.grpcwire`, not grpcio
(whose C core, BoringSSL and threads were ~15 MiB of an idle agent): importing them and their discovery
and CA clients in a fresh interpreter must not load `grpc`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import {module}
from mesh.secrets.client import CAClient
from mesh.xds.client import ClientConfig, XdsClient
from mesh.xds.node import NodeInfo
from mesh.xds.trio_client import open_xds_client
XdsClient(ClientConfig(target="127.0.0.1:1", node=NodeInfo(id="probe")))
CAClient("127.0.0.1:1", b"", "token").close()
loaded = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "grpc_")) or m.endswith("_pb2_grpc"))
print(" ".join(loaded) or "none")
"""


@pytest.mark.parametrize("module", ["nodeagent.app", "waypoint.app"])
def test_the_data_plane_does_not_import_grpcio(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none", f"{module} imported {out.stdout.strip()}"
