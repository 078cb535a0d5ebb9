"""nodeagent/redirect package."""
