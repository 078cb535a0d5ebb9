"""Where configuration lives: the versioned store, the apply API in front of it, and the sources
translation and discovery read from."""
