"""The waypoint's pure L7 logic: compiled rules, routing, authorization, JWT, retries, outlier
detection, load balancing and limits (no I/O)."""
