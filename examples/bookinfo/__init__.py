"""Istio's bookinfo sample as small Python services, its cluster file, and the `make demo` script
that enrolls it live."""
