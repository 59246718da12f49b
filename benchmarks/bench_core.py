"""Core platform: no-op throughput, CPU per task and priority isolation, beside plain Celery.

Sides, all on the same Redis and the same two cores, each with its defaults and WARNING logs:

* ``celery``: plain Celery, ``celery worker -c 2`` (prefork), queue ``celery``;
* ``taskyard``: ``taskyard worker --profile all -c 2`` (prefork, all five queues);
* ``fast``: ``taskyard worker --profile fast -c 2`` (two solo-pool processes, all five queues,
  the lean execution path);
* ``fast-celery``: the same with ``TASKYARD_LEAN_PATH=false`` (Celery's strategy and request);
* ``dramatiq``: Dramatiq 2 processes x 8 threads (its own venv, ``scripts/ensure-bench-peers.sh``);
* ``fast-auto``: the fast profile at its own process count on 2 cores;
* ``fast-watched``: ``fast`` with a subscriber to every event attached (as with Flower open):
  task events are published only while something listens, so this is their cost.

The drain times a backlog queued before the worker starts, once its first fifth ran; end to
end sends while the worker runs. CPU per task is user+sys of the worker's whole process tree
over the timed window, divided by the tasks run in it: on a shared machine
it drifts far less than the rate. Sides alternate within each round; each figure is the round
with the median ratio, stored with every round and the load average at its start and end; the
run warns when it starts above a load average of ``BENCH_MAX_LOAD`` (1.0).
"""

from __future__ import annotations

import importlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import (
    BENCH_REDIS_URL,
    Result,
    load_average,
    percentile,
    warn_if_loaded,
)
from taskyard.config import Settings
from taskyard.testing import ROOT, child_env, spawn, tree_cpu_s, wait_until
from taskyard.workers.profiles import default_fast_processes

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", BENCH_REDIS_URL)
ENV = {"TASKYARD_REDIS_URL": REDIS_URL, "BENCH_CORE_REDIS_URL": REDIS_URL}
#: BENCH_CORE_GUARDS=off runs taskyard's workers without resource guards: on a machine other
#: processes keep busy, the guards would (rightly) hold the benchmark's own work back.
GUARDS_OFF = os.environ.get("BENCH_CORE_GUARDS", "on") == "off"
if GUARDS_OFF:
    ENV["TASKYARD_GUARD__ENABLED"] = "false"
PEERS_PYTHON = ROOT / ".bench-peers" / "bin" / "python"
#: Most messages each fast-profile process reserves (taskyard's default).
FAST_PREFETCH = int(Settings.model_fields["fast_prefetch_multiplier"].default)
#: Processes the fast profile starts on 2 cores when -c is not given (taskyard's default).
FAST_AUTO = default_fast_processes(Settings(), cores=2)
#: Run time (ms) one fetch of a fast-profile process brings at most (taskyard's default).
FETCH_BUDGET_MS = float(Settings.model_fields["fetch_budget_ms"].default)
APPS = {"celery": "benchmarks.apps.core_plain", "taskyard": "benchmarks.apps.core_taskyard"}
ALL = "critical,high,normal,low,batch"
#: Environment of a side beyond ENV: ``fast-celery`` is the fast profile on Celery's own
#: strategy, the lean path's baseline.
SIDE_ENV = {"fast-celery": {"TASKYARD_LEAN_PATH": "false"}}


def _argv(side: str, queues: str | None = None) -> list[str]:
    taskyard_cli = [sys.executable, "-m", "taskyard.cli", "worker", "-A", APPS["taskyard"]]
    if side == "celery":
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APPS["celery"],
            "worker",
            "-Q",
            queues or "celery",
            "-c",
            "2",
            "-n",
            "bench-plain@%h",
        ]
    if side == "taskyard":
        return [*taskyard_cli, "--profile", "all", "-c", "2", "-n", "bench-ty@%h"]
    if side in ("fast", "fast-celery", "fast-watched"):
        return [*taskyard_cli, "--profile", "fast", "-c", "2"]
    if side == "fast-auto":
        # The process count the profile takes by itself on 2 cores, as Dramatiq's 2 x 8 below
        # is its own default there (a process per core, 8 threads each).
        return [*taskyard_cli, "--profile", "fast", "-c", str(FAST_AUTO)]
    if side == "dramatiq":
        return [
            str(PEERS_PYTHON),
            "-m",
            "dramatiq",
            "benchmarks.apps.core_dramatiq",
            "-p",
            "2",
            "-t",
            "8",
        ]
    raise ValueError(f"unknown side {side!r}")


class Worker:
    """One benchmarked worker: its own process group, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self, side: str, log_dir: Path, env: dict[str, str] | None = None, queues: str | None = None
    ) -> None:
        self.log = log_dir / f"{side}-{time.monotonic_ns()}.log"
        own = {**ENV, **SIDE_ENV.get(side, {}), **(env or {})}
        self.process = spawn(_argv(side, queues), own, self.log)

    def cpu_s(self) -> float:
        """User+sys CPU seconds of the worker's process tree so far."""
        return tree_cpu_s(self.process.pid)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"worker exited:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(20)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def _task(side: str, name: str) -> Any:
    """The task object of ``side``'s own app (both apps live in this process)."""
    module = importlib.import_module(APPS[side])
    prefix = "bench.ty." if side == "taskyard" else "bench."
    return module.app.tasks[prefix + name]


def _done(client: redis.Redis) -> int:
    return int(client.get("bench:done") or 0)


def _enqueue(side: str, n: int) -> None:
    if side == "dramatiq":
        subprocess.run(
            [str(PEERS_PYTHON), "-m", "benchmarks.apps.core_dramatiq", str(n)],
            env=child_env(ENV),
            cwd=ROOT,
            check=True,
            timeout=600,
        )
        return
    task = _task("celery" if side == "celery" else "taskyard", "noop")
    for _ in range(n):
        task.delay()


def _wait_done(client: redis.Redis, worker: Worker, n: int, what: str) -> None:
    def finished() -> bool:
        worker.check()
        return _done(client) >= n

    wait_until(finished, 600, 0.005, what)


def enqueue_rate(side: str, n: int, client: redis.Redis) -> float:
    """Tasks/s one process sends with ``.delay()`` (plain Celery's is ``apply_async``)."""
    task = _task(side, "noop")
    task.delay()  # connect first
    client.flushdb()
    started = time.perf_counter()
    for _ in range(n):
        task.delay()
    elapsed = time.perf_counter() - started
    client.flushdb()
    return n / elapsed


#: Share of a drain's tasks run before its timed window opens: the processes of a side that
#: starts several (prefork's pool, the fast profile, Dramatiq) do not begin at the same moment,
#: and counting from the first task would charge the later ones' start-up to the rate.
WARM_UP = 0.2


class EventListener:
    """What Flower does to a worker's event traffic: a subscriber to every event, reading them
    all (a thread of this process), so the worker publishes its task events."""

    def __init__(self, client: redis.Redis) -> None:
        db = client.connection_pool.connection_kwargs.get("db", 0)
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"/{db}.celeryev/*")
        self.messages = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self.pubsub.get_message(timeout=0.1) is not None:
                self.messages += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()


def drain(
    side: str,
    n: int,
    client: redis.Redis,
    log_dir: Path,
    env: dict[str, str] | None = None,
    warm_up: float = WARM_UP,
) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) draining ``n`` no-op tasks queued before the worker starts,
    timed once ``warm_up`` of them ran (0: from the first task). ``fast-watched`` drains with
    an :class:`EventListener` attached."""
    client.flushdb()
    _enqueue(side, n)
    listener = EventListener(client) if side == "fast-watched" else None
    worker = Worker(side, log_dir, env)
    try:

        def warm() -> bool:
            worker.check()
            return bool(client.exists("bench:first")) and _done(client) >= n * warm_up

        wait_until(warm, 120, 0.002, f"{side} to start draining")
        start, cpu0, done0 = time.time(), worker.cpu_s(), _done(client)
        timed = n - done0
        if not warm_up:
            start, timed = float(client.get("bench:first") or start), n
        _wait_done(client, worker, n, f"{side} to drain {n}")
        end, cpu1 = time.time(), worker.cpu_s()
    finally:
        worker.stop()
        if listener is not None:
            listener.close()
            if not listener.messages:
                raise AssertionError("fast-watched: the listener saw no task events")
    client.flushdb()
    return timed / (end - start), (cpu1 - cpu0) / max(1, n - done0) * 1e6


def end_to_end(side: str, n: int, client: redis.Redis, log_dir: Path) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) from the first send until the running worker ran all ``n``."""
    client.flushdb()
    worker = Worker(side, log_dir)
    try:
        _enqueue(side, 1)  # a warm-up task: the worker is consuming once it has run
        _wait_done(client, worker, 1, f"{side} to start")
        client.delete("bench:done", "bench:first")
        cpu0 = worker.cpu_s()
        started = time.perf_counter()
        _enqueue(side, n)
        _wait_done(client, worker, n, f"{side} to run {n}")
        elapsed, cpu1 = time.perf_counter() - started, worker.cpu_s()
    finally:
        worker.stop()
    client.flushdb()
    return n / elapsed, (cpu1 - cpu0) / n * 1e6


def flood_then_criticals(
    side: str, worker: Worker, flood: int, criticals: int, client: redis.Redis
) -> None:
    """Send ``flood`` 5 ms low tasks, then ``criticals`` critical ones 20 ms apart, and wait
    until every critical task has pushed its wait (sent -> started) to ``bench:waits``."""
    app_side = "celery" if side == "celery" else "taskyard"
    low, critical = _task(app_side, "low"), _task(app_side, "critical")
    for _ in range(flood):
        low.delay(0.005)
    for _ in range(criticals):
        critical.delay(time.time())
        time.sleep(0.02)

    def ran() -> bool:
        worker.check()
        return bool(client.llen("bench:waits") >= criticals)

    wait_until(ran, 900, 0.05, f"{side} critical tasks")


def critical_waits(
    side: str, flood: int, criticals: int, client: redis.Redis, log_dir: Path
) -> list[float]:
    """Waits (s, sent -> started) of critical tasks sent after a flood of 5 ms low tasks."""
    client.flushdb()
    worker = Worker(side, log_dir)
    try:
        _enqueue(side, 1)  # a warm-up task: the worker is consuming once it has run
        _wait_done(client, worker, 1, f"{side} to start")
        flood_then_criticals(side, worker, flood, criticals, client)
    finally:
        worker.stop()
    waits = [float(w) for w in client.lrange("bench:waits", 0, -1)]
    client.flushdb()
    return waits


@dataclass
class Round:
    """One measurement of one side: its rate, CPU per task and the load around it."""

    rate: float
    cpu_us: float
    load_start: float
    load_end: float


Table = dict[str, list[Round]]


def _median_round(
    ours: list[float], theirs: list[float], higher_is_better: bool = True
) -> tuple[float, float, str]:
    """The round whose ratio is the median, and every round's ratio (> 1 is better)."""

    def ratio(a: float, b: float) -> float:
        return a / b if higher_is_better else b / a

    rounds = sorted(zip(ours, theirs, strict=True), key=lambda pair: ratio(*pair))
    a, b = rounds[len(rounds) // 2]
    return a, b, ", ".join(f"{ratio(x, y):.2f}" for x, y in zip(ours, theirs, strict=True))


def _rounds(sides: list[str], rounds: int, measure: Callable[[str], tuple[float, float]]) -> Table:
    out: Table = {side: [] for side in sides}
    for index in range(rounds):
        # Sides alternate, and each round starts with the next one, so the shared machine's
        # load and any warm-up weigh on every side alike.
        for side in sides[index % len(sides) :] + sides[: index % len(sides)]:
            load_start = load_average()
            rate, cpu = measure(side)
            out[side].append(Round(rate, cpu, load_start, load_average()))
            print(
                f"   {side}: {rate:,.0f}/s, {cpu:,.0f} µs CPU/task "
                f"(load {load_start:.2f} -> {out[side][-1].load_end:.2f})",
                file=sys.stderr,
                flush=True,
            )
    return out


def compare(
    benchmark: str,
    metric: str,
    table: Table,
    ours: str,
    theirs: str,
    *,
    cpu: bool = False,
    unit: str = "tasks/s",
    goal: str = "",
    notes: str = "",
) -> Result:
    """``ours`` against ``theirs`` in ``table``: the median-ratio round, with every round."""
    pick: Callable[[Round], float] = (lambda r: r.cpu_us) if cpu else (lambda r: r.rate)
    a_all = [pick(r) for r in table[ours]]
    b_all = [pick(r) for r in table[theirs]]
    a, b, ratios = _median_round(a_all, b_all, higher_is_better=not cpu)
    both = table[ours] + table[theirs]
    return Result(
        benchmark,
        metric,
        "µs" if cpu else unit,
        a,
        b,
        goal,
        higher_is_better=not cpu,
        notes=f"{notes}; median of {len(a_all)} alternating rounds, ratios ({ratios})".lstrip("; "),
        rounds=[
            {
                ours: round(x.rate, 1),
                theirs: round(y.rate, 1),
                # Measures without a worker (sending) have no CPU figure.
                **(
                    {f"{ours}_cpu_us": round(x.cpu_us, 1), f"{theirs}_cpu_us": round(y.cpu_us, 1)}
                    if x.cpu_us or y.cpu_us
                    else {}
                ),
                "load_start": round(min(x.load_start, y.load_start), 2),
                "load_end": round(max(x.load_end, y.load_end), 2),
            }
            for x, y in zip(table[ours], table[theirs], strict=True)
        ],
        load_start=round(min(r.load_start for r in both), 2),
        load_end=round(max(r.load_end for r in both), 2),
    )


def run(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 5_000
    #: Drains are longer: their first fifth is a warm-up outside the timed window.
    drain_n = 2_000 if quick else 15_000
    flood = 1_000 if quick else 5_000
    criticals = 20 if quick else 50
    # Rates on this kind of shared machine swing by a third from second to second, both sides
    # alike: the goal rows take the median of 5 alternating rounds (9 for the short .delay()
    # loops), the end-to-end rows 3.
    rounds = 1 if quick else 5
    e2e_rounds = 1 if quick else 3
    load_at_start = warn_if_loaded("the core benchmark")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    have_dramatiq = PEERS_PYTHON.exists()
    if not have_dramatiq:
        print(
            "WARNING: no Dramatiq peer (run scripts/ensure-bench-peers.sh): fast-profile "
            "figures are given against plain Celery only",
            file=sys.stderr,
        )
    drain_sides = ["celery", "taskyard", "fast", "fast-celery"] + (
        ["dramatiq", "fast-auto", "fast-watched"] if have_dramatiq else []
    )
    guards = "; taskyard guards off" if GUARDS_OFF else ""
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        log_dir = Path(tmp)
        enq = _rounds(
            ["celery", "taskyard"],
            1 if quick else 9,
            lambda side: (enqueue_rate(side, n, client), 0.0),
        )
        drains = _rounds(drain_sides, rounds, lambda side: drain(side, drain_n, client, log_dir))
        e2e = _rounds(
            ["celery", "taskyard", "fast"],
            e2e_rounds,
            lambda side: end_to_end(side, n, client, log_dir),
        )
        waits: dict[str, list[float]] = {}
        loads: dict[str, tuple[float, float]] = {}
        for side in ("taskyard", "celery", "fast"):
            before = load_average()
            waits[side] = critical_waits(side, flood, criticals, client, log_dir)
            loads[side] = (before, load_average())

    rows.append(
        compare(
            "core.throughput",
            ".delay() vs plain apply_async",
            enq,
            "taskyard",
            "celery",
            goal=">= 2x",
            notes=f"N={n} no-op sends from one process, no worker",
        )
    )
    worker = {
        "taskyard": "one worker -c 2 prefork",
        "fast": "fast profile, 2 solo processes (lean path)",
    }
    for side, rate_goal, cpu_goal in (
        ("taskyard", ">= 2x", "<= 0.5x plain (ratio >= 2)"),
        ("fast", "", ""),
    ):
        rows.append(
            compare(
                f"core.{'throughput' if side == 'taskyard' else 'fast'}",
                f"drain rate, {worker[side]}",
                drains,
                side,
                "celery",
                goal=rate_goal,
                notes=f"N={drain_n} no-op tasks queued first, timed after the first "
                f"{WARM_UP:.0%}; vs plain Celery -c 2 defaults{guards}",
            )
        )
        rows.append(
            compare(
                "core.cpu",
                f"worker CPU per task, drain, {side}",
                drains,
                side,
                "celery",
                cpu=True,
                goal=cpu_goal,
                notes="user+sys of the worker's process tree / tasks run in the timed window",
            )
        )
        rows.append(
            compare(
                f"core.{'throughput' if side == 'taskyard' else 'fast'}",
                f"end to end rate, {worker[side]}",
                e2e,
                side,
                "celery",
                notes=f"N={n} no-op tasks sent while the worker runs, vs plain Celery{guards}",
            )
        )
    rows.append(
        compare(
            "core.fast",
            "worker CPU per task, drain, lean path vs Celery's strategy",
            drains,
            "fast",
            "fast-celery",
            cpu=True,
            notes="'celery' column is the fast profile with TASKYARD_LEAN_PATH=false",
        )
    )
    if have_dramatiq:
        rows.append(
            compare(
                "core.fast",
                "drain rate, fast vs Dramatiq 2 x 8",
                drains,
                "fast",
                "dramatiq",
                goal=">= 1.5x Dramatiq",
                notes="'celery' column is Dramatiq 2 processes x 8 threads, Redis broker, "
                f"default middleware{guards}",
            )
        )
        rows.append(
            compare(
                "core.cpu",
                "worker CPU per task, drain, fast vs Dramatiq",
                drains,
                "fast",
                "dramatiq",
                cpu=True,
                goal="<= 0.67x Dramatiq (ratio >= 1.5)",
                notes="'celery' column is Dramatiq",
            )
        )
        rows.append(
            compare(
                "core.cpu",
                "worker CPU per task, drain, fast with task events watched vs Dramatiq",
                drains,
                "fast-watched",
                "dramatiq",
                cpu=True,
                notes="fast -c 2 with a subscriber to every event (as with Flower open), so its "
                "task events are published; without one they pause; 'celery' column is Dramatiq",
            )
        )
        rows.append(
            compare(
                "core.fast",
                f"drain rate, fast at its 2-core default ({FAST_AUTO} processes) vs Dramatiq 2 x 8",
                drains,
                "fast-auto",
                "dramatiq",
                goal=">= 1.5x Dramatiq",
                notes="each side as it starts by itself on 2 cores: fast "
                "TASKYARD_FAST_PROCESSES_PER_CORE per core, Dramatiq a process per core with 8 "
                f"threads; 'celery' column is Dramatiq{guards}",
            )
        )
        rows.append(
            compare(
                "core.cpu",
                "worker CPU per task, drain, fast at its 2-core default vs Dramatiq 2 x 8",
                drains,
                "fast-auto",
                "dramatiq",
                cpu=True,
                goal="<= 0.67x Dramatiq (ratio >= 1.5)",
                notes="'celery' column is Dramatiq",
            )
        )
    for pct in (50, 99):
        ty, pc = (percentile(waits[s], pct) * 1000 for s in ("taskyard", "celery"))
        rows.append(
            Result(
                "core.priority_isolation",
                f"critical wait p{pct}",
                "ms",
                ty,
                pc,
                "p99 <= 25 ms" if pct == 99 else "",
                higher_is_better=False,
                notes=f"{flood} low tasks of 5 ms queued first, then {criticals} "
                "critical 20 ms apart; one worker on all queues -c 2; plain "
                "Celery default settings (one queue); one round",
                load_start=round(loads["taskyard"][0], 2),
                load_end=round(loads["taskyard"][1], 2),
            )
        )
    rows.append(
        Result(
            "core.priority_isolation",
            "critical wait p99, fast profile",
            "ms",
            percentile(waits["fast"], 99) * 1000,
            percentile(waits["celery"], 99) * 1000,
            "p99 <= 25 ms",
            higher_is_better=False,
            notes=f"as above, on the fast profile (2 solo processes, each fetching up to "
            f"{FAST_PREFETCH} messages, as many as fit in {FETCH_BUDGET_MS:g} ms of observed "
            "run time: a critical task waits behind about that much low work); one round",
            load_start=round(loads["fast"][0], 2),
            load_end=round(loads["fast"][1], 2),
        )
    )
    ty_p99 = percentile(waits["taskyard"], 99) * 1000
    pc_p50 = statistics.median(waits["celery"]) * 1000
    rows.append(
        Result(
            "core.priority_isolation",
            "plain p50 / taskyard p99",
            "x",
            pc_p50 / ty_p99,
            None,
            ">= 100x",
        )
    )
    print(
        f"core benchmark: load average {load_at_start:.2f} at the start, "
        f"{load_average():.2f} at the end",
        file=sys.stderr,
    )
    return rows
