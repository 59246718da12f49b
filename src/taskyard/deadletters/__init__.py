"""The one dead-letter store for every task: failed, crashed, poison, expired.

``install`` is what ``create_app`` calls: it connects the receivers that record failed and
expired tasks and adds the consumer gate (poison quarantine, bounded redelivery). It does no I/O.
"""

from __future__ import annotations

from taskyard.deadletters.entry import REASONS, REPLAY_HEADER, DeadLetter, Query
from taskyard.deadletters.hooks import install
from taskyard.deadletters.memory import MemoryDeadLetterStore
from taskyard.deadletters.store import DeadLetterStore, RedisDeadLetterStore

__all__ = [
    "REASONS",
    "REPLAY_HEADER",
    "DeadLetter",
    "DeadLetterStore",
    "MemoryDeadLetterStore",
    "Query",
    "RedisDeadLetterStore",
    "install",
]
