"""The demo stack beside a program that keeps both cores busy, for a minute (slow).

The issue's soak, short and with loose bounds for CI (the exact figures come from
``python -m benchmarks overload``, ten minutes per side): ``taskyard up`` with the demo producer
and two busy loops; almost nothing is re-published, normal work keeps flowing, batches are
flushed, no reaper task goes through beat, critical work waits milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks.bench_overload import BATCH_MAX_WAIT_S, soak

from tests import servers

pytestmark = pytest.mark.slow


def test_demo_stack_beside_a_cpu_hog(tmp_path: Path) -> None:
    servers.require_program("redis-server")
    figures = soak("now", seconds=60.0, warmup_s=20.0, log_dir=tmp_path)
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1, default=str))
    print(figures)
    assert figures["runs"] >= 300  # the producer sends 20/s: most of it ran
    assert figures["deferrals_per_run"] < 0.02
    p95 = figures["wait_p95_s"]
    # Loose: milliseconds in the benchmark; 1.6 s measured with the machine at load average 17.
    assert p95["critical"] is not None and p95["critical"] < 5.0
    # Loose: the goal (<= 5 s, met in the benchmark's runs) depends on what else the machine
    # runs; the landed design measured 52 s here (normal deferred over and over).
    assert p95["normal"] is not None and p95["normal"] <= 30.0
    assert figures["oldest_batch_item_s"] <= BATCH_MAX_WAIT_S + 10.0
    assert figures["reaps"] == 0
    assert figures["other_vs_stack"] > 0.5
