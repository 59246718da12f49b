"""Database access of the example service."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from examples.bdc.models import Appointment, Base, Beneficiary, Evaluation, Trainer, User
from taskyard.database import engine as task_engine
from taskyard.runtime import runtime_of


def engine() -> Engine:
    """The app's engine from taskyard (pool from settings, one per worker process)."""
    from examples.bdc.app import app

    return task_engine(runtime_of(app))


@contextmanager
def session() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with sessionmaker(engine())() as db, db.begin():
        yield db


def seed(users: int = 200, trainers: int = 10, seed_value: int = 7) -> None:
    """Create the schema and, on an empty database, a realistic population."""
    Base.metadata.create_all(engine())
    with session() as db:
        if db.scalar(select(func.count()).select_from(User)):
            return
        rng = random.Random(seed_value)
        now = datetime.utcnow()
        staff = [
            User(email=f"trainer{i}@bdc.example", username=f"trainer{i}", role="trainer")
            for i in range(trainers)
        ]
        db.add_all(staff)
        db.flush()
        coaches = [
            Trainer(user_id=u.id, specialty=rng.choice(["career", "skills", "language"]))
            for u in staff
        ]
        db.add_all(coaches)
        people = [
            User(email=f"user{i}@bdc.example", username=f"user{i}", is_active=rng.random() > 0.1)
            for i in range(users)
        ]
        db.add_all(people)
        db.flush()
        for person in people:
            coach = rng.choice(coaches)
            beneficiary = Beneficiary(user_id=person.id, trainer_id=coach.id)
            db.add(beneficiary)
            db.flush()
            for k in range(3):
                start = now + timedelta(days=rng.randint(-30, 30), hours=k)
                db.add(
                    Appointment(
                        beneficiary_id=beneficiary.id,
                        trainer_id=coach.id,
                        start_time=start,
                        end_time=start + timedelta(hours=1),
                        status="completed" if start < now else "scheduled",
                    )
                )
            db.add(
                Evaluation(
                    beneficiary_id=beneficiary.id,
                    trainer_id=coach.id,
                    due_date=now + timedelta(days=rng.randint(-10, 20)),
                    status=rng.choice(["pending", "done"]),
                )
            )
