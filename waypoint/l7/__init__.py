"""waypoint.l7 package."""
