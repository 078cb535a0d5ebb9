"""mesh/proto package."""
