"""mesh/cli package."""
