"""Who the caller is, for `tinker auth login` (GET /api/v1/auth/apikey/me) and `tinker auth
logout` (DELETE: a key revokes itself, and nothing else; its tokens go with it).

The SDK's login stores the answer's `key_id` as a number: a key id `key-<12 hex digits>`
is given as that hexadecimal number. A team server has no users or organisations apart
from its keys: the "email" is the key's name (or id), the organisation the server's.
"""

from __future__ import annotations

import zlib
from typing import Any

from tinsmith.scheduler.access import ApiKeys, Caller
from tinsmith.scheduler.tokens import Tokens
from tinsmith.storage.db import MetadataStore
from tinsmith.types import UserError

ORG_NAME = "tinsmith"
OPEN_NOTE = "this server is open: no API keys exist, every request is served"


def numeric_key_id(key_id: str) -> int:
    """`key-<hex>` as the number the SDK expects (any other id: a stable 32-bit hash)."""
    digits = key_id.removeprefix("key-")
    try:
        return int(digits, 16)
    except ValueError:
        return zlib.crc32(key_id.encode())


def describe_key(db: MetadataStore, caller: Caller) -> dict[str, Any]:
    """The calling key's public metadata, in the shape `tinker auth login` reads."""
    if caller.key_id is None:
        return {"key_id": 0, "name": "open", "note": OPEN_NOTE,
                "details": {"org_details": {"name": ORG_NAME}, "user_details": {"email": "open"}}}
    row = db.get_api_key(caller.key_id)
    name = (row.name if row is not None else None) or caller.key_id
    note = f"Tinsmith API key {caller.key_id}" + (" (admin)" if caller.admin else "")
    if row is not None and row.expires_at is not None:
        note += f", expires {row.expires_at.isoformat()}"
    return {"key_id": numeric_key_id(caller.key_id), "name": name, "note": note,
            "details": {"org_details": {"name": ORG_NAME}, "user_details": {"email": name}}}


def revoke_own_key(db: MetadataStore, keys: ApiKeys, tokens: Tokens, caller: Caller) -> None:
    """Revoke the calling key (audited with the key itself as the actor)."""
    if caller.key_id is None:
        raise UserError("this server is open (no API keys): there is no key to delete")
    db.revoke_api_key(caller.key_id, actor=caller.key_id)
    keys.revoke(caller.key_id)  # already revoked: this only empties the server's key cache
    tokens.forget()  # and its tokens'

