"""The node agent's DNS proxy (port 15053 in each enrolled pod): messages, the name table, the upstream
resolver and the per-pod server."""
