"""Short-lived signed tokens standing for an API key (POST /api/v1/auth/token).

The SDK's JWT mode (`pjwt_auth_enabled`) exchanges its key for a token here and sends the
token in `X-API-Key` instead of the key; `RestClient.whoami()` and `tinker auth whoami`
read the caller's identity from a token's claims, and only work with one. A token is a
JWT (HS256) with the claims the SDK reads: `sub` (the key id), `org_id`, `email` (the
key's name), `iat`, `exp`, and `iss` = "passport-tinsmith" (the SDK accepts a token given
directly as its credential only from an issuer named `passport-...`).

A token is as good as its key and no better: each use checks that the key still exists,
is not revoked and has not expired (remembered for `cache_s`, 1 s, as for keys), so
revoking a key refuses its tokens too. The signing key is derived from the server's stored
secret (tinsmith.scheduler.signing.stored_secret): deleting that file voids every token.
A refused token answers 401 with `WWW-Authenticate: ... error="invalid_token"`, on which
the SDK fetches a new token and replays the request once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from starlette.exceptions import HTTPException

from tinsmith.scheduler.access import OPEN, ApiKeys, Caller

ISSUER = "passport-tinsmith"
ORG_ID = "tinsmith"
TOKEN_PREFIX = "eyJ"  # base64url of '{"': every JWT starts so
_HEADER = {"alg": "HS256", "typ": "JWT"}
_OPEN_SUB = "open"  # the subject of a token made while the server had no keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidToken(HTTPException):
    """401 telling the SDK to get a new token."""

    def __init__(self, why: str) -> None:
        super().__init__(401, f"invalid token: {why}",
                         headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Tokens:
    def __init__(self, secret: bytes, keys: ApiKeys, ttl_s: float = 3600.0,
                 cache_s: float = 1.0) -> None:
        self._key = hmac.new(secret, b"tinsmith auth token v1", hashlib.sha256).digest()
        self.keys = keys
        self.ttl_s = ttl_s
        self._cache_s = cache_s
        self._good: dict[str, tuple[Caller, float]] = {}  # token -> (caller, valid until)

    def _sign(self, signing_input: str) -> str:
        return _b64(hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest())

    def mint(self, caller: Caller) -> str:
        """A token standing for the caller's key, valid for `ttl_s`."""
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": caller.key_id or _OPEN_SUB, "org_id": ORG_ID,
                  "email": caller.name or caller.key_id or _OPEN_SUB,
                  "iat": now, "exp": now + int(self.ttl_s)}
        head = _b64(json.dumps(_HEADER).encode()) + "." + _b64(json.dumps(claims).encode())
        return head + "." + self._sign(head)

    def forget(self) -> None:
        """Drop the remembered tokens (a key was revoked here: refuse its tokens at once)."""
        self._good.clear()

    def cached(self, token: str) -> Caller | None:
        """The caller of a token checked within the last `cache_s` (never blocks)."""
        hit = self._good.get(token)
        return hit[0] if hit is not None and time.monotonic() < hit[1] else None

    def authenticate(self, token: str) -> Caller:
        """The caller a token stands for; InvalidToken (401) if it does not stand for one
        now. May read the database (the key's row). An open server (no keys) takes any."""
        if not self.keys.enabled():
            return OPEN
        claims = self._claims(token)
        left = float(claims["exp"]) - time.time()
        if left <= 0:
            raise InvalidToken("it has expired")
        sub = str(claims["sub"])
        row = self.keys.db.get_api_key(sub) if sub != _OPEN_SUB else None
        expired = row is not None and row.expires_at is not None and \
            row.expires_at.timestamp() <= time.time()
        if row is None or row.revoked_at is not None or expired:
            raise InvalidToken("its API key is invalid or has been revoked")
        caller = Caller(row.key_id, admin=row.is_admin, name=row.name)
        if len(self._good) > 4096:
            self._good.clear()
        self._good[token] = (caller, time.monotonic() + min(self._cache_s, left))
        return caller

    def _claims(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("not a JWT")
        head, payload, signature = parts
        if not hmac.compare_digest(self._sign(head + "." + payload), signature):
            raise InvalidToken("bad signature (not made by this server)")
        try:
            header, claims = json.loads(_unb64(head)), json.loads(_unb64(payload))
        except ValueError as e:
            raise InvalidToken("malformed") from e
        if header.get("alg") != "HS256" or claims.get("iss") != ISSUER or "exp" not in claims \
                or "sub" not in claims:
            raise InvalidToken("not a token of this server")
        return claims
