"""The node agent: one per node, capturing the traffic of the node's pods in the mesh and carrying it
over HBONE with the pods' identities, enforcing L4 policy and exporting metrics."""
