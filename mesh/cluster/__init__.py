"""mesh/cluster package."""
