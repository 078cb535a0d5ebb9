"""nodeagent/proxy package."""
