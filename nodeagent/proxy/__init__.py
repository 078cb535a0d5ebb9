"""A pod's proxies: routing and inbound decisions as values, then the I/O (outbound 15001, plaintext
inbound 15006, HBONE inbound 15008) and one outcome reporter."""
