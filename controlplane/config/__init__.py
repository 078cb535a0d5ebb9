"""controlplane.config package."""
