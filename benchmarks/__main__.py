"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--quick]``.

Each ``benchmarks/bench_<name>.py`` exposes ``run(quick: bool) -> list[Result]``. Results are
printed as a table and merged into ``benchmarks/results.json`` (a run of some benchmarks keeps
the others' last figures).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks.common import Result

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def table(rows: list[Result]) -> str:
    lines = [
        "| benchmark | metric | taskyard | plain Celery | ratio | goal |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        celery = "" if r.celery is None else f"{r.celery:,.4g}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(
            f"| {r.benchmark} | {r.metric} ({r.unit}) | {r.taskyard:,.4g} | {celery} | "
            f"{ratio} | {r.goal} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {available()})")
    parser.add_argument("--quick", action="store_true", help="smaller N, for a smoke run")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")

    results: list[Result] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        started = time.monotonic()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        rows = module.run(quick=args.quick)
        print(f"== {name} done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        print(table(rows), file=sys.stderr, flush=True)
        results.extend(rows)

    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"results": {}}
    for row in results:
        stored["results"][f"{row.benchmark}/{row.metric}"] = {
            **row.as_dict(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": args.quick,
        }
    stored["machine"] = {
        "python": platform.python_version(),
        "cpus": _cpus(),
        "platform": platform.platform(),
    }
    RESULTS.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    print(table(results))
    print(f"\nwritten to {RESULTS.relative_to(HERE.parent)}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
