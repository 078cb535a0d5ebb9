"""`meshctl agent services`: a ServiceEntry host says what it is (the entry, its resolution, its location)."""

from __future__ import annotations

from meshctl import agentviews


def test_entry_hosts_are_told_apart_from_services() -> None:
    data = {"node": "node-1", "services": [
        {"name": "api.example.com", "namespace": "apps", "hostname": "api.example.com", "vips": ["240.240.7.9"],
         "ports": [{"service_port": 443}], "resolution": "RESOLUTION_DNS", "mesh_external": True,
         "source_kind": "ServiceEntry", "source_name": "ext", "endpoints": [{"workload_uid": "x", "healthy": True}]},
        {"name": "db.internal", "namespace": "apps", "hostname": "db.internal", "vips": ["10.250.0.1"],
         "ports": [{"service_port": 5432}], "source_kind": "ServiceEntry", "source_name": "db"},
        {"name": "web", "namespace": "apps", "hostname": "web.apps.svc.cluster.local", "vips": ["10.96.0.5"],
         "ports": [{"service_port": 80}]},
    ]}
    lines = agentviews.render_services(data).splitlines()
    assert any("api.example.com (serviceentry/ext: DNS, external)" in line and "240.240.7.9" in line for line in lines)
    assert any("db.internal (serviceentry/db: STATIC, internal)" in line for line in lines)
    assert any(line.split()[:2] == ["apps", "web"] for line in lines)
