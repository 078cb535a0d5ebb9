"""mesh/api package."""
