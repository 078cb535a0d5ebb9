"""Security regression tests: each reproduces one hole of the security issue (it failed before the fix)."""
