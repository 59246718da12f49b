"""The audit trail: every operator action, who did it, when, to what, and how many it touched.

One Redis stream (``keys.audit``), appended by the API and by the ``taskyard`` commands that
act (replay, purge, cancel, pause, limits, users), capped at about
``monitoring.audit_max_entries``. Entries are read newest first for the dashboard's page and
``GET /api/v1/audit``. Actors' and targets' text is stored as given and escaped where shown.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, Query

from taskyard.keys import Keys
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.users import Action
from taskyard.serialization import text


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    at: float
    actor: str
    role: str
    action: str
    target: str
    count: int
    #: Where the action came from: "api", "dashboard" or "cli".
    via: str
    detail: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    def __init__(self, client: redis.Redis, keys: Keys, max_entries: int = 100_000) -> None:
        self.redis = client
        self.keys = keys
        self.max_entries = max_entries

    def record(
        self,
        *,
        actor: str,
        role: str,
        action: str,
        target: str = "",
        count: int = 1,
        via: str = "api",
        detail: dict[str, Any] | None = None,
    ) -> str:
        fields: dict[Any, Any] = {
            "at": repr(time.time()),
            "actor": actor,
            "role": role,
            "action": action,
            "target": target,
            "count": str(int(count)),
            "via": via,
            "detail": json.dumps(detail or {}, default=str),
        }
        return text(
            self.redis.xadd(self.keys.audit(), fields, maxlen=self.max_entries, approximate=True)
        )

    def recent(
        self, limit: int = 100, *, actor: str | None = None, action: str | None = None
    ) -> list[AuditEntry]:
        """Newest first, at most ``limit``, optionally of one actor or action."""
        found: list[AuditEntry] = []
        upper = "+"
        while len(found) < limit:
            page = self.redis.xrevrange(self.keys.audit(), max=upper, min="-", count=500)
            if not page:
                break
            for raw_id, raw in page:
                entry = _entry(text(raw_id), raw or {})
                if (actor is None or entry.actor == actor) and (
                    action is None or entry.action == action
                ):
                    found.append(entry)
                    if len(found) >= limit:
                        break
            last = text(page[-1][0])
            ms, _, seq = last.partition("-")
            if seq == "0":
                if ms == "0":
                    break
                upper = f"{int(ms) - 1}-18446744073709551615"
            else:
                upper = f"{ms}-{int(seq) - 1}"
        return found


def _entry(raw_id: str, raw: dict[Any, Any]) -> AuditEntry:
    fields = {text(k): text(v) for k, v in raw.items()}
    try:
        detail = json.loads(fields.get("detail", "{}"))
    except ValueError:
        detail = {}
    return AuditEntry(
        id=raw_id,
        at=float(fields.get("at", "0")),
        actor=fields.get("actor", ""),
        role=fields.get("role", ""),
        action=fields.get("action", ""),
        target=fields.get("target", ""),
        count=int(fields.get("count", "0") or 0),
        via=fields.get("via", ""),
        detail=detail if isinstance(detail, dict) else {},
    )


def audit_router(state: Any) -> APIRouter:
    """``GET /api/v1/audit``: the newest operator actions (admins only)."""
    router = APIRouter(tags=["audit"])

    @router.get(
        "/audit",
        dependencies=[Depends(state.auth.require(Action.READ_AUDIT))],
        response_model=list[m.AuditEntry],
    )
    def audit(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        actor: Annotated[str | None, Query(max_length=200)] = None,
        action: Annotated[str | None, Query(max_length=200)] = None,
    ) -> list[dict[str, Any]]:
        """Who did what, when, to what and to how many; newest first."""
        return [asdict(e) for e in state.auth.audit.recent(limit, actor=actor, action=action)]

    return router
