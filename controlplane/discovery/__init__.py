"""controlplane.discovery.server package."""
