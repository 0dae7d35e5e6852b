"""engine layer of Tinsmith (see docs/architecture.md)."""
