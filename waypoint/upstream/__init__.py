"""The waypoint's way to its endpoints: HBONE or plain TCP connectors, the keep-alive pool, and
forwarding one routed request with retries and timeouts."""
