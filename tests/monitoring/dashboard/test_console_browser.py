"""The console in headless Chromium against a real `taskyard api`: log in, filter the dead
letters, replay every match (count, confirm), see the audit entry; a viewer gets no forms and a
page elsewhere cannot act for the user; search a waiting task, open its page and cancel it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.deadletters import DeadLetter, RedisDeadLetterStore
from taskyard.keys import Keys
from taskyard.monitoring.api.users import Role, UserStore
from taskyard.runtime import runtime_of
from tests.monitoring.dashboard.test_browser import (
    ARTIFACTS,
    BROWSER_ARGS,
    CHROMIUM,
    require_browser,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PASSWORD = "correct horse battery"


def _seed(redis_client: redis.Redis, make_app: Any) -> RedisDeadLetterStore:
    store = RedisDeadLetterStore.for_runtime(runtime_of(make_app("console")))
    now = time.time()
    for i in range(5):
        store.record(
            DeadLetter(
                id=f"b{i}",
                reason="failed",
                name="shop.charge" if i < 3 else "shop.refund",
                queue="high",
                args=json.dumps([i, "<script>alert(1)</script>"]),
                exception_type="ValueError",
                exception="declined",
                first_at=now - 30,
                last_at=now - 5 + i,
            )
        )
    users = UserStore(redis_client, Keys())
    users.add("ops", Role.OPERATOR, PASSWORD)
    users.add("eve", Role.VIEWER, PASSWORD)
    return store


def test_login_filter_replay_and_audit_in_chromium(
    redis_client: redis.Redis,
    make_app: Any,
    redis_env: dict[str, str],
    taskyard_api: Callable[[dict[str, str]], str],
    tmp_path: Path,
) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    store = _seed(redis_client, make_app)
    url = taskyard_api(redis_env)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            dialogs: list[str] = []

            def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.goto(f"{url}/dashboard/dead")
            assert page.url.startswith(f"{url}/login"), "the dashboard asks for a login"
            page.fill("input[name=username]", "ops")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/dashboard/dead")
            assert "ops (operator)" in page.inner_text("header")
            page.fill("form.filters input[name=name]", "shop.charge")
            page.click("form.filters button[type=submit]")
            page.wait_for_url("**name=shop.charge**")
            page.click("form.actions button[value=replay]")
            page.wait_for_selector("#confirm")
            assert "Replay 3 dead letter(s)?" in page.inner_text("main")
            page.click("#confirm")
            page.wait_for_selector("p.done")
            assert "replayed 3 of 3" in page.inner_text("p.done")
            page.screenshot(path=str(ARTIFACTS / "console-dead.png"), full_page=True)
            assert store.count() == 2
            assert dialogs == [], "hostile text in an argument ran as script"
            # A page of another origin posting the same form carries no token: refused.
            forged = page.request.post(
                f"{url}/dashboard/dead/action",
                form={"op": "replay", "name": "shop.refund", "confirm": "yes"},
            )
            assert forged.status == 403 and store.count() == 2
            # A viewer sees the entries, no forms, no arguments.
            page.goto(f"{url}/logout")
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/login")
            page.fill("input[name=username]", "eve")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/dashboard")
            page.goto(f"{url}/dashboard/dead")
            assert page.locator("form.actions").count() == 0
            assert "<script>" not in page.inner_text("main")
            assert page.goto(f"{url}/dashboard/audit") is not None
            assert "for admins" in page.inner_text("main")
        finally:
            browser.close()
    entries = redis_client.xrevrange(Keys().audit(), count=10)
    actions = [fields[b"action"].decode() for _, fields in entries]
    assert "dead.replay" in actions and actions.count("session.login") == 2


def test_search_open_and_cancel_a_waiting_task_in_chromium(
    redis_client: redis.Redis,
    make_app: Any,
    redis_env: dict[str, str],
    taskyard_api: Callable[[dict[str, str]], str],
) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    from tests.apps import jobs

    make_app("jobs")
    waiting = jobs.record.delay(1).id  # no worker runs: it waits in its queue
    UserStore(redis_client, Keys()).add("ops", Role.OPERATOR, PASSWORD)
    url = taskyard_api(redis_env)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/dashboard/tasks")
            page.fill("input[name=username]", "ops")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/dashboard/tasks")
            page.fill("#search input[name=task]", waiting)
            page.click("#search button[type=submit]")
            page.wait_for_url(f"{url}/dashboard/task/{waiting}")
            page.check("#cancel-task input[name=terminate]")
            page.click("#cancel-task button[type=submit]")
            page.wait_for_selector("#task-cancel")
            assert "by dashboard:ops" in page.inner_text("#task-cancel")
            page.screenshot(path=str(ARTIFACTS / "console-cancel.png"), full_page=True)
        finally:
            browser.close()
    assert redis_client.zscore(Keys().cancel_index(), waiting) is not None
    entries = redis_client.xrevrange(Keys().audit(), count=10)
    assert [
        fields[b"target"].decode() for _, fields in entries if fields[b"action"] == b"tasks.cancel"
    ] == [waiting]
