"""The wire messages: the CA (Istio-compatible CreateCertificate) and the discovery resources,
generated from the .proto files beside them (scripts/gen-protos.sh)."""
