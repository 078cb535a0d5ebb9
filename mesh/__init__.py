"""The ground every component stands on, importing nothing above it: the config model, protobufs,
discovery client, secrets, HBONE, L4 policy, the serving stack, identities and defaults."""
