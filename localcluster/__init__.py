"""The local cluster: a real multi-node cluster built from network namespaces on one machine (spec,
pure plan, network, processes, lifecycle, waypoint controller)."""
