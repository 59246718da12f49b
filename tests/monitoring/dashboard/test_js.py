"""dashboard.js formats numbers as the server does: a chart's axis, legend and hover title agree.

Runs the script in Node (Debian's nodejs) with a stand-in document; skips without Node.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from taskyard.monitoring.api.docs import STATIC_DIR
from taskyard.monitoring.dashboard.charts import format_value

CASES = [
    (0.1, "s"),
    (0.075, "s"),
    (0.0015, "s"),
    (0.0, "s"),
    (2.5, "s"),
    (42.0, "s"),
    (100.0, "%"),
    (12.5, "%"),
    (12_345.0, "msg"),
    (2_500_000.0, "msg"),
    (1.5, "/s"),
    (0.25, ""),
    (7.0, ""),
    (150.0, "items"),
    (None, "s"),
]


def test_script_formats_like_the_server() -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    script = (STATIC_DIR / "dashboard.js").read_text()
    harness = (
        "global.window = {}; global.document = {readyState: 'complete', "
        "querySelectorAll: () => [], body: {dataset: {}}, "
        "getElementById: () => null};\n"
        + script
        + f"\nconsole.log(JSON.stringify({json.dumps(CASES)}.map("
        "([v, u]) => window.taskyardFormat(v, u))));"
    )
    done = subprocess.run(
        [node, "-e", harness], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(done.stdout) == [format_value(v, u) for v, u in CASES]
