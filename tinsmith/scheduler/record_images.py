"""Images of recorded sampling prompts, stored once each by the SHA-256 of their bytes.

Sampling records (sampling_records.py) live in memory and a restart forgets them; the images
their prompts held live beside them here, for as long as a record names them. Each image is
kept once however many records name it (the samples of one request, or the same picture
sent again): `add` counts a reference, `release` drops one, and the last release frees the
bytes. The owner (StabilityRecords) serialises every call under its own lock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Stored:
    data: bytes
    format: str  # "png" / "jpeg", as first sent
    refs: int  # records naming it


class RecordImages:
    """Content-addressed image bytes with reference counts. Not thread-safe on its own."""

    def __init__(self) -> None:
        self._images: dict[str, _Stored] = {}  # sha256 hex -> the image
        self.bytes = 0  # total stored bytes (each image once)

    def __len__(self) -> int:
        return len(self._images)

    def add(self, key: str, data: bytes, fmt: str) -> None:
        """Store `data` under `key`, the SHA-256 hex of its bytes (the caller hashes it, out of
        any lock), or count one more reference to what is stored there."""
        held = self._images.get(key)
        if held is None:
            self._images[key] = _Stored(bytes(data), fmt, 1)
            self.bytes += len(data)
        else:
            held.refs += 1

    def release(self, key: str) -> None:
        """One reference fewer; the bytes go with the last one."""
        held = self._images.get(key)
        if held is None:
            return
        held.refs -= 1
        if held.refs <= 0:
            del self._images[key]
            self.bytes -= len(held.data)

    def get(self, key: str) -> bytes:
        """The bytes stored under `key` (KeyError if none: a live record always has them)."""
        return self._images[key].data
