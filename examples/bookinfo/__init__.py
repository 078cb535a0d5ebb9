"""examples/bookinfo package."""
