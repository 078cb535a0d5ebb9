"""controlplane.translate.snapshot package."""
