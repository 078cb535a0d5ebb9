"""The one admin / metrics / readiness HTTP stack every process uses: routes, standard endpoints, client.
One style, trio + h11 (`server`); the asyncio control plane runs it in a thread of its own (`thread`)."""
