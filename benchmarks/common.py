"""What every benchmark shares: the result row, timing helpers, the Redis database it owns."""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

#: Redis database the benchmarks own (flushed by each benchmark before it runs); apart from the
#: test suite's databases, so a benchmark and the tests can run at the same time.
BENCH_REDIS_URL = os.environ.get("TASKYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")
BENCH_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
#: One-minute load average above which a benchmark warns that its figures are not a quiet
#: machine's (BENCH_MAX_LOAD; 1.0 suits the 2-core box the figures come from).
MAX_QUIET_LOAD = float(os.environ.get("BENCH_MAX_LOAD", "1.0"))


def load_average() -> float:
    """The machine's one-minute load average."""
    return os.getloadavg()[0]


def warn_if_loaded(what: str) -> float:
    """The load average now; warns on stderr when it is above :data:`MAX_QUIET_LOAD`."""
    load = load_average()
    if load > MAX_QUIET_LOAD:
        print(
            f"WARNING: {what} starts at a load average of {load:.2f} (above {MAX_QUIET_LOAD}): "
            "other processes share the cores; rates will be low and noisy, CPU per task "
            "less so. Compare alternating rounds, and give the load with every figure.",
            file=sys.stderr,
            flush=True,
        )
    return load


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
    #: Every round behind the figure, e.g. {"taskyard": 1850.0, "celery": 900.0, "load": 1.2}.
    rounds: list[dict[str, float]] = field(default_factory=list)
    #: Load average when the figure's measurements started and ended.
    load_start: float | None = None
    load_end: float | None = None

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
