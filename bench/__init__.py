"""The benchmark: no mesh, mesh L4, mesh L7 and Envoy sidecars side by side on one local cluster,
reported as ratios within one run (see bench/README.md)."""
