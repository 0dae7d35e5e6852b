"""Signed download URLs for checkpoint files (get_external_weights_urls).

The SDK downloads the URLs it is given with a plain GET, without its API key, so the URL
itself is the permission: `?expires=<unix s>&signature=<hex>` where the signature is an
HMAC-SHA256, under a secret only the server knows, of the training run, the checkpoint
id, the file name and the expiry. Whoever may see the checkpoint when the URLs are made gets
them; a URL is good for that one file until it expires, across server restarts: the secret
is made once and kept in the data dir (`stored_secret`: a file only its owner reads).
Deleting that file revokes every URL given out (a new one is made at the next start).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "url-signing.key"
_SECRET_BYTES = 32


@dataclass(frozen=True)
class SignedFile:
    expires: int
    signature: str


class UrlSigner:
    def __init__(self, ttl_s: float, secret: bytes | None = None) -> None:
        self.ttl_s = ttl_s
        self._secret = secret or secrets.token_bytes(_SECRET_BYTES)

    @classmethod
    def stored(cls, data_dir: Path, ttl_s: float) -> UrlSigner:
        """A signer whose URLs outlive restarts: its secret is kept in `data_dir`."""
        return cls(ttl_s, stored_secret(data_dir))

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


def stored_secret(data_dir: Path) -> bytes:
    """The signing secret kept in `<data_dir>/url-signing.key` (mode 0600), made on first use.

    Made under a temporary name and linked into place, so servers starting together on one
    data dir agree on one secret and none reads a half-written file.
    """
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        tmp = path.with_name(f"{SECRET_FILE}.tmp-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"{path} does not hold a {_SECRET_BYTES}-byte signing secret; delete "
                         "it to make a new one (download URLs given out so far stop working)")
    return secret
