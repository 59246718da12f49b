"""A demo producer: a realistic mixed workload through all five levels, until stopped.

A small share of it fails on purpose (declined cards, a flaky calendar provider retried with a
backoff, malformed imports), so dead letters, failure charts and alerts show something from the
first minutes.

Besides sending tasks it reads the service's cached functions (a user's profile, a beneficiary's
upcoming appointments, the system settings) as the service's request handlers do, so the
dashboard's cache panel shows real hit rates: misses at first, then mostly hits once the
warmers and earlier reads have filled the cache.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from datetime import datetime

from examples.bdc import tasks, warmers
from examples.bdc.db import seed

log = logging.getLogger("bdc.demo")


def run(rate_per_s: float = 20.0, seed_value: int = 11) -> None:
    seed()
    rng = random.Random(seed_value)
    running = True

    def stop(_signum: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sent = 0
    month = datetime.utcnow().strftime("%Y-%m")
    while running:
        roll = rng.random()
        user = rng.randint(11, 210)
        if roll < 0.02:
            tasks.revoke_sessions.delay(user)
        elif roll < 0.12:
            tasks.send_urgent_notification.delay(user, "Your appointment starts in 15 minutes")
        elif roll < 0.45:
            tasks.reschedule_appointment.delay(rng.randint(1, 600), rng.choice([-30, 30, 60]))
        elif roll < 0.47:
            tasks.monthly_report.delay(month)
        elif roll < 0.48:
            # A payment; one card in ten is declined (dead letter, card number redacted).
            card = f"4111 1111 1111 {rng.randint(0, 9999):04d}"
            tasks.charge_card.delay(user, rng.randint(500, 9000), card)
        elif roll < 0.50:
            tasks.sync_calendar.delay(user)  # fails half the time, retried with a backoff
        elif roll < 0.503:
            tasks.import_contacts.delay(user, {"rows": []})  # malformed: always fails
        else:
            send_batch = getattr(tasks, "send_notification_batch", None)
            if send_batch is not None:
                send_batch.delay({"user_id": user, "channel": "email", "template": "digest"})
        # A request handler of the service reads through the cache.
        read = rng.random()
        if read < 0.6:
            warmers.user_profile(user)
        elif read < 0.9:
            warmers.upcoming_appointments(rng.randint(1, 200))
        elif read < 0.95:
            warmers.system_settings()
        sent += 1
        if sent % 200 == 0:
            log.info("demo producer: %d messages sent", sent)
        time.sleep(rng.expovariate(rate_per_s))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run()
