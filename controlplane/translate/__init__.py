"""Translation, pure: a configuration snapshot in, discovery resources out (workloads, services,
L4 authorization, L7 routes for waypoints)."""
