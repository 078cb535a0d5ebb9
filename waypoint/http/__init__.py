"""waypoint.http package."""
