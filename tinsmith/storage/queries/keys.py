"""API keys (tinsmith.scheduler.access holds what they mean)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from tinsmith.storage.models import ApiKeyModel, ApiKeyRow, to_row
from tinsmith.storage.queries.audit import audit_model
from tinsmith.storage.queries.base import StoreBase, utcnow


class ApiKeyQueries(StoreBase):
    def add_api_key(self, key_id: str, *, key_hash: str, hint: str, name: str | None = None,
                    is_admin: bool = False, expires_at: datetime | None = None,
                    **limits: int | None) -> ApiKeyRow:
        """`limits`: max_concurrent, max_request_tokens, max_stored_bytes (None: default)."""
        obj = ApiKeyModel(key_id=key_id, key_hash=key_hash, hint=hint, name=name,
                          is_admin=is_admin, created_at=utcnow(), revoked_at=None,
                          expires_at=expires_at, **limits)
        with self._tx(write=True) as s:
            s.add(obj)
            # Audited in the same transaction: keys are made by the CLI, outside any server.
            s.add(audit_model("key_created", key_id, key_id=key_id, name=name, admin=is_admin,
                              actor="operator"))
        return to_row(ApiKeyRow, obj)

    def api_key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        with self._tx() as s:
            obj = s.scalars(select(ApiKeyModel).where(ApiKeyModel.key_hash == key_hash)).first()
            return None if obj is None else to_row(ApiKeyRow, obj)

    def get_api_key(self, key_id: str) -> ApiKeyRow | None:
        with self._tx() as s:
            obj = s.get(ApiKeyModel, key_id)
            return None if obj is None else to_row(ApiKeyRow, obj)

    def set_api_key_limits(self, key_id: str, **limits: int | None) -> bool:
        """Set some of a key's limits (None: back to the server's default); False if no such key."""
        return self._update(ApiKeyModel, key_id, **limits)

    def list_api_keys(self) -> list[ApiKeyRow]:
        with self._tx() as s:
            return [to_row(ApiKeyRow, o)
                    for o in s.scalars(select(ApiKeyModel).order_by(ApiKeyModel.created_at))]

    def has_api_keys(self) -> bool:
        """Whether any key was ever created (revoked ones count)."""
        with self._tx() as s:
            return s.scalars(select(ApiKeyModel.key_id).limit(1)).first() is not None

    def revoke_api_key(self, key_id: str, actor: str = "operator") -> bool:
        """Mark a key revoked (kept, so it is never reissued); False if there is no such key.
        `actor`: who revoked it, for the audit log (a key id, or "operator": the CLI)."""
        with self._tx(write=True) as s:
            obj = s.get(ApiKeyModel, key_id)
            if obj is None:
                return False
            if obj.revoked_at is None:
                obj.revoked_at = utcnow()
                s.add(audit_model("key_revoked", key_id, key_id=key_id, name=obj.name, actor=actor))
            return True
