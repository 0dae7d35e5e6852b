"""api layer of Tinsmith (see docs/architecture.md)."""
