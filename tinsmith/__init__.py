"""Tinsmith: a self-hosted server for the Tinker training API.

`tinsmith.local(...)` starts an embedded server on a free loopback port and yields its
base URL; `tinsmith serve` runs one from the command line.
"""

__version__ = "0.1.0"


def local(*args, **kwargs):
    """Embedded server context manager; see tinsmith.embedded.local."""
    from tinsmith.embedded import local as _local

    return _local(*args, **kwargs)


__all__ = ["__version__", "local"]
