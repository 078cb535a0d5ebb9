"""bpf package."""
