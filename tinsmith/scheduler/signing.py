"""Signed download URLs for checkpoint files (get_external_weights_urls).

The SDK downloads the URLs it is given with a plain GET, without its API key, so the URL
itself is the permission: `?expires=<unix s>&signature=<hex>` where the signature is an
HMAC-SHA256, under a secret only this server process knows, of the training run, the
checkpoint id, the file name and the expiry. Whoever may see the checkpoint when the URLs
are made gets them; a URL is good for that one file until it expires (or the server
restarts, which makes a new secret).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SignedFile:
    expires: int
    signature: str


class UrlSigner:
    def __init__(self, ttl_s: float, secret: bytes | None = None) -> None:
        self.ttl_s = ttl_s
        self._secret = secret or secrets.token_bytes(32)

    def _mac(self, run_id: str, checkpoint_id: str, name: str, expires: int) -> str:
        msg = "\n".join((run_id, checkpoint_id, name, str(expires))).encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def expiry(self) -> int:
        return int(time.time() + self.ttl_s)

    def sign(self, run_id: str, checkpoint_id: str, name: str, expires: int) -> SignedFile:
        return SignedFile(expires, self._mac(run_id, checkpoint_id, name, expires))

    def valid(self, run_id: str, checkpoint_id: str, name: str, expires: int,
              signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self._mac(run_id, checkpoint_id, name, expires), signature)
