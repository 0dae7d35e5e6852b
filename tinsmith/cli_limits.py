"""Command-line options for per-key limits and key expiry (`tinsmith serve`, `tinsmith keys`).

Limits are whole numbers or `none` (unlimited). On `keys create|limits` a limit left out
keeps the server's default, and `default` sets it back to that. Durations are a number and
a unit: `90s`, `30m`, `12h`, `30d`.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from tinsmith.storage.db import ApiKeyRow

LIMITS = ("max_concurrent", "max_request_tokens", "max_stored_bytes")
DEFAULT = "default"  # on a key: use the server's default
_HELP = {
    "max_concurrent": "requests not yet completed (queued or running); more get 429",
    "max_request_tokens": "tokens in one forward/forward_backward/sample request; more get 413",
    "max_stored_bytes": "bytes of stored checkpoints; a save past it fails with 413",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m is None or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 30m, 12h, 30d")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _limit(text: str) -> int | None:
    if text.lower() in ("none", "unlimited"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: a positive whole number or 'none'")
    return int(text)


def _key_limit(text: str) -> int | None | str:
    return DEFAULT if text.lower() == DEFAULT else _limit(text)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    for name in LIMITS:
        p.add_argument("--" + name.replace("_", "-"), type=_limit, default=argparse.SUPPRESS,
                       metavar="N", help=f"default per-key limit on {_HELP[name]} ('none': unlimited)")
    p.add_argument("--max-body-bytes", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="largest request body accepted; bigger ones get 413 (default 64 MiB)")


def serve_settings(args: argparse.Namespace) -> dict[str, int | None]:
    """The ServerSettings fields the serve options set (only those given)."""
    return {n: getattr(args, n) for n in (*LIMITS, "max_body_bytes") if hasattr(args, n)}


def add_key_args(p: argparse.ArgumentParser) -> None:
    for name in LIMITS:
        p.add_argument("--" + name.replace("_", "-"), type=_key_limit, default=argparse.SUPPRESS,
                       metavar="N", help=f"this key's limit on {_HELP[name]} "
                       "('none': unlimited, 'default': the server's)")


def key_limits(args: argparse.Namespace) -> dict[str, int | None]:
    """The limit columns the options set; a key column None means the server's default.
    'none' (unlimited) is stored as 0, which no positive limit can be."""
    out: dict[str, int | None] = {}
    for name in LIMITS:
        if hasattr(args, name):
            value = getattr(args, name)
            out[name] = None if value == DEFAULT else (0 if value is None else value)
    return out


def describe(row: ApiKeyRow) -> str:
    """A key's own limits and expiry, for `keys list`."""
    parts = []
    for name in LIMITS:
        value = getattr(row, name)
        if value is not None:
            parts.append(f"{name}={'none' if value == 0 else value}")
    if row.expires_at is not None:
        parts.append(f"expires {row.expires_at:%Y-%m-%d %H:%M}")
    return "  ".join(parts)
