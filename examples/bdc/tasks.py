"""Tasks of the example service, one or more at every level."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update

from examples.bdc.db import session
from examples.bdc.models import Appointment, Evaluation, Notification, Report, User
from taskyard import batch_task, priority_task


@priority_task(priority="critical")
def revoke_sessions(user_id: int) -> int:
    """Security: invalidate every session of a user at once; returns the new session version."""
    with session() as db:
        db.execute(
            update(User).where(User.id == user_id).values(session_version=User.session_version + 1)
        )
        return int(db.scalar(select(User.session_version).where(User.id == user_id)) or 0)


@priority_task(priority="critical")
def lock_account(user_id: int) -> None:
    """Security: deactivate an account and revoke its sessions."""
    with session() as db:
        db.execute(
            update(User)
            .where(User.id == user_id)
            .values(is_active=False, session_version=User.session_version + 1)
        )


@priority_task(priority="high")
def send_urgent_notification(user_id: int, message: str) -> int:
    """Real-time notification; returns the notification id."""
    with session() as db:
        note = Notification(user_id=user_id, channel="push", message=message, urgent=True)
        db.add(note)
        db.flush()
        return int(note.id)


@priority_task  # user-facing operation: normal
def reschedule_appointment(appointment_id: int, shift_minutes: int) -> str | None:
    """Move an appointment; returns its new start time (ISO) or None if it does not exist."""
    with session() as db:
        appointment = db.get(Appointment, appointment_id)
        if appointment is None:
            return None
        delta = timedelta(minutes=shift_minutes)
        appointment.start_time += delta
        appointment.end_time += delta
        appointment.status = "scheduled"
        return appointment.start_time.isoformat()


@priority_task(priority="low", requires_memory_mb=256)  # waits for 256 MB free
def monthly_report(month: str) -> dict[str, int]:
    """Background report: appointments and evaluations of a month ("YYYY-MM"), per trainer."""
    start = datetime.strptime(month, "%Y-%m")
    end = (start + timedelta(days=32)).replace(day=1)
    with session() as db:
        rows = db.execute(
            select(
                Appointment.trainer_id,
                func.count(),
                func.sum(case((Appointment.status == "completed", 1), else_=0)),
            )
            .where(Appointment.start_time >= start, Appointment.start_time < end)
            .group_by(Appointment.trainer_id)
        ).all()
        done = dict(
            db.execute(
                select(Evaluation.trainer_id, func.count())
                .where(
                    Evaluation.status == "done",
                    Evaluation.due_date >= start,
                    Evaluation.due_date < end,
                )
                .group_by(Evaluation.trainer_id)
            ).all()
        )
        for trainer_id, total, completed in rows:
            db.add(
                Report(
                    month=month,
                    trainer_id=trainer_id,
                    appointments=total,
                    completed=int(completed or 0),
                    evaluations_done=int(done.get(trainer_id, 0)),
                )
            )
        return {"trainers": len(rows), "appointments": sum(int(r[1]) for r in rows)}


@batch_task(batch_name="email_notifications", batch_size=100, max_wait=2.0)
def send_notification_batch(items: list[dict[str, Any]]) -> int:
    """Digest e-mails, buffered: one INSERT per batch of up to 100; returns how many."""
    with session() as db:
        db.add_all(
            [
                Notification(
                    user_id=int(item["user_id"]),
                    channel=str(item.get("channel", "email")),
                    message=str(item.get("message") or item.get("template", "digest")),
                    urgent=False,
                )
                for item in items
            ]
        )
    return len(items)


class CalendarUnavailable(Exception):
    """The (simulated) calendar provider did not answer: worth retrying."""


@priority_task(priority="high", redact=("card_number",))
def charge_card(user_id: int, amount_cents: int, card_number: str) -> str:
    """Payment: the card number never appears on a page, in the CLI or in Flower ([redacted]).

    Cards ending in 0 are declined: the task fails and its message goes to the dead letters,
    where an operator can look at it (redacted) and replay it (with the real number)."""
    if card_number.endswith("0"):
        raise ValueError(f"card declined for user {user_id}")
    return f"charged {amount_cents} cents"


@priority_task(
    priority="normal",
    autoretry_for=(CalendarUnavailable,),
    retry_backoff=1,
    retry_backoff_max=8,
    max_retries=4,
)
def sync_calendar(user_id: int, flakiness: float = 0.5) -> int:
    """External call that fails now and then and is retried with a backoff (broker-side delay)."""
    import random

    if random.random() < flakiness:
        raise CalendarUnavailable(f"calendar provider timed out for user {user_id}")
    return user_id


@priority_task(priority="low")
def import_contacts(user_id: int, payload: dict[str, Any]) -> int:
    """Bulk import that fails on a malformed payload: the demo sends a few, so the failure
    charts, the dead letters and the alerts have something to show from the first minutes."""
    return len(payload["contacts"])
