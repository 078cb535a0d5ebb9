"""waypoint.upstream.connect package."""
