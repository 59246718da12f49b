"""Cached reads of the example service and the warmers that fill them before users ask.

The reads are what the service's pages show most: a user's profile, a beneficiary's upcoming
appointments, the system settings. Each warmer loads its entries with one query and primes the
cache under the very keys the cached functions read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from examples.bdc.app import app
from examples.bdc.db import session
from examples.bdc.models import Appointment, Beneficiary, Trainer, User
from taskyard.cache.core import Cache, cached
from taskyard.cache.warming import cache_warmer

#: How far ahead "upcoming" looks (s): the reminder and calendar views show two weeks.
UPCOMING_WINDOW_S = 14 * 86_400.0


def _profile(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "username": user.username,
        "role": user.role,
        "is_active": user.is_active,
    }


@cached(resource="user", tags=["users", "user:{user_id}"], app=app)
def user_profile(user_id: int) -> dict[str, Any] | None:
    """A user's profile (None for an unknown id)."""
    with session() as db:
        user = db.get(User, user_id)
        return None if user is None else _profile(user)


def _appointment(a: Appointment) -> dict[str, Any]:
    return {
        "id": a.id,
        "trainer_id": a.trainer_id,
        "start": a.start_time.isoformat(),
        "end": a.end_time.isoformat(),
    }


def _upcoming_query(since: datetime) -> Any:
    return (
        select(Appointment)
        .where(
            Appointment.status == "scheduled",
            Appointment.start_time >= since,
            Appointment.start_time < since + timedelta(seconds=UPCOMING_WINDOW_S),
        )
        .order_by(Appointment.start_time)
    )


@cached(resource="beneficiary", tags=["appointments", "beneficiary:{beneficiary_id}"], app=app)
def upcoming_appointments(beneficiary_id: int) -> list[dict[str, Any]]:
    """A beneficiary's scheduled appointments of the next two weeks, soonest first."""
    with session() as db:
        query = _upcoming_query(datetime.utcnow()).where(
            Appointment.beneficiary_id == beneficiary_id
        )
        return [_appointment(a) for a in db.scalars(query)]


@cached(resource="settings", tags=["settings"], app=app)
def system_settings() -> dict[str, Any]:
    """Settings every page needs: specialties on offer, trainer count, booking rules."""
    with session() as db:
        specialties = sorted(s for s in db.scalars(select(Trainer.specialty).distinct()) if s)
        trainers = int(db.scalar(select(func.count()).select_from(Trainer)) or 0)
    return {
        "specialties": specialties,
        "trainers": trainers,
        "slot_minutes": 60,
        "booking_horizon_days": int(UPCOMING_WINDOW_S // 86_400),
    }


@cache_warmer("active_users", description="profiles of every active user")
def warm_active_users(cache: Cache) -> int:
    with session() as db:
        users = list(db.scalars(select(User).where(User.is_active.is_(True))))
        for user in users:
            user_profile.prime(_profile(user), user.id)  # type: ignore[attr-defined]
    return len(users)


@cache_warmer("upcoming_appointments", description="next two weeks, per beneficiary")
def warm_upcoming_appointments(cache: Cache) -> int:
    by_beneficiary: dict[int, list[dict[str, Any]]] = {}
    with session() as db:
        ids = list(db.scalars(select(Beneficiary.id)))
        for appointment in db.scalars(_upcoming_query(datetime.utcnow())):
            by_beneficiary.setdefault(appointment.beneficiary_id, []).append(
                _appointment(appointment)
            )
    # Beneficiaries with nothing upcoming are cached too: an empty calendar is an answer.
    for beneficiary_id in ids:
        upcoming_appointments.prime(  # type: ignore[attr-defined]
            by_beneficiary.get(beneficiary_id, []), beneficiary_id
        )
    return len(ids)


@cache_warmer("settings", description="system settings")
def warm_settings(cache: Cache) -> int:
    system_settings.invalidate()  # type: ignore[attr-defined]
    system_settings()
    return 1
