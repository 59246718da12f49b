"""What every benchmark shares: the result row, timing helpers, the Redis database it owns."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any

#: Redis database the benchmarks own (flushed by each benchmark before it runs); apart from the
#: test suite's databases, so a benchmark and the tests can run at the same time.
BENCH_REDIS_URL = os.environ.get("TASKYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
BENCH_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass
class Result:
    """One measured figure, taskyard beside plain Celery where there is a comparison."""

    benchmark: str  # e.g. "core.throughput"
    metric: str  # what was measured, e.g. "end-to-end tasks/s"
    unit: str
    taskyard: float
    celery: float | None = None
    goal: str = ""
    higher_is_better: bool = True
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        """taskyard / celery for rates; celery / taskyard for costs, so > 1 always means better."""
        if self.celery in (None, 0) or self.taskyard == 0:
            return None
        assert self.celery is not None
        return self.taskyard / self.celery if self.higher_is_better else self.celery / self.taskyard

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, int(pct * 10) - 1)]
