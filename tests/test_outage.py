"""Outage: a background loop's repeating failure, logged once in full, then briefly."""

from __future__ import annotations

import logging

import pytest

from taskyard.outage import Outage


def test_first_failure_in_full_then_one_line_per_period_then_the_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.outage")
    outage = Outage(logging.getLogger("test.outage"), "writing things", every_s=0.0)
    quiet = Outage(logging.getLogger("test.outage"), "reading things", every_s=3600.0)
    for _ in range(3):
        try:
            raise ConnectionError("refused")
        except ConnectionError as exc:
            outage.failed(exc)
            quiet.failed(exc)
    records = [r for r in caplog.records if "writing things" in r.getMessage()]
    assert [r.exc_info is not None for r in records] == [True, False, False]
    assert "still failing after 3 attempts" in records[-1].getMessage()
    # With a long period, only the first failure is logged.
    assert len([r for r in caplog.records if "reading things" in r.getMessage()]) == 1
    outage.ok()
    outage.ok()
    assert caplog.text.count("writing things works again after 3 failures") == 1
    assert outage.failures == 0
