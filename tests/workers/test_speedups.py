"""The tracer speedups (taskyard.workers.speedups) give what Celery's own steps give."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import signals
from celery.app import trace as celery_trace
from celery.app.task import Context
from celery.utils.saferepr import saferepr
from hypothesis import given
from hypothesis import strategies as st

from taskyard.workers import speedups

CELERY_HEADERS = Context._get_custom_headers


@pytest.fixture
def installed() -> Iterator[None]:
    was_installed = bool(speedups._original)
    speedups.install()
    yield
    if not was_installed:
        speedups.uninstall()


def _request(**extra: Any) -> dict[str, Any]:
    """A request dict as the worker builds it from a protocol 2 message."""
    return {
        "lang": "py",
        "task": "t.add",
        "id": "1",
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": "1",
        "parent_id": None,
        "argsrepr": "(1, 2)",
        "kwargsrepr": "{}",
        "origin": "gen1@host",
        "ignore_result": True,
        "properties": {"delivery_tag": "x"},
        "reply_to": None,
        "correlation_id": "1",
        "hostname": "w@host",
        "delivery_info": {"routing_key": "normal"},
        "args": [1, 2],
        "kwargs": {},
        "is_eager": False,
        **extra,
    }


@pytest.mark.parametrize(
    "extra",
    [{}, {"x-trace": "abc", "tenant": 7}, {"compression": "zlib"}, {"taskyard_unique": "k"}],
)
def test_custom_headers_as_celery(extra: dict[str, Any]) -> None:
    request = _request(**extra)
    ours = speedups.custom_headers(Context(), request, called_directly=False)
    assert ours == CELERY_HEADERS(Context(), request, called_directly=False)
    assert ours == ({k: v for k, v in extra.items() if k != "compression"} or None)


@given(
    st.dictionaries(
        st.one_of(st.sampled_from(sorted(speedups.CELERY_KEYS)), st.text(max_size=8)),
        st.integers(),
        max_size=12,
    )
)
def test_custom_headers_as_celery_for_any_keys(request: dict[str, Any]) -> None:
    assert speedups.custom_headers(Context(), request) == CELERY_HEADERS(Context(), request)
    # The tracer's form: the request and Celery's own keywords.
    tracer_form = {"args": [1], "called_directly": False, "kwargs": {}}
    assert speedups.custom_headers(Context(), request, **tracer_form) == CELERY_HEADERS(
        Context(), request, **tracer_form
    )
    # Keywords that are not Celery's take the general path.
    assert speedups.custom_headers(Context(), request, extra=1) == CELERY_HEADERS(
        Context(), request, extra=1
    )


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -5,
        2**53 - 1,
        -(2**53) + 1,
        2**53,
        2**80,
        "x",
        "é" * 3,
        [1, 2],
        {"a": 1},
        list(range(2000)),
        1.5,
    ],
)
def test_result_repr_as_saferepr(value: Any) -> None:
    assert speedups.result_repr(value, 1024) == saferepr(value, 1024)


def test_install_puts_each_in_place_and_context_uses_it(installed: None) -> None:
    assert Context._get_custom_headers is speedups.custom_headers
    assert celery_trace.saferepr is speedups.result_repr
    assert all(signal.use_caching for signal in speedups.TASK_SIGNALS)
    context = Context(_request(tenant="t1"), args=[1], called_directly=False, kwargs={})
    assert context.headers == {"tenant": "t1"}
    assert Context(_request()).headers is None


def test_uninstall_restores_celery() -> None:
    was_installed = bool(speedups._original)
    speedups.install()
    speedups.uninstall()
    try:
        assert Context._get_custom_headers is CELERY_HEADERS
        assert celery_trace.saferepr is saferepr
        assert not any(signal.use_caching for signal in speedups.TASK_SIGNALS)
    finally:
        if was_installed:
            speedups.install()


class _Sender:
    """A hashable sender (Celery's dispatcher keys its cache on the sender, as tasks are)."""

    def __init__(self, name: str) -> None:
        self.name = name


def test_cached_signals_follow_connect_disconnect_and_dead_receivers(installed: None) -> None:
    sender_a, sender_b = _Sender("a"), _Sender("b")
    calls: list[tuple[str, Any]] = []

    def everyone(sender: Any = None, **_: Any) -> None:
        calls.append(("everyone", sender.name))

    def only_b(sender: Any = None, **_: Any) -> None:
        calls.append(("only_b", sender.name))

    signal = signals.task_prerun
    signal.send(sender=sender_a)  # cached: no receiver of ours yet
    signal.connect(everyone, weak=False)
    signal.connect(only_b, sender=sender_b, weak=False)
    try:
        signal.send(sender=sender_a)
        signal.send(sender=sender_b)
        signal.send(sender=sender_b)
        assert calls == [
            ("everyone", "a"),
            ("everyone", "b"),
            ("only_b", "b"),
            ("everyone", "b"),
            ("only_b", "b"),
        ]
        signal.disconnect(only_b, sender=sender_b)
        calls.clear()
        signal.send(sender=sender_b)
        assert calls == [("everyone", "b")]

        class Holder:
            def on(self, sender: Any = None, **_: Any) -> None:
                calls.append(("weak", sender.name))

        holder = Holder()
        signal.connect(holder.on)  # weak: gone with the holder
        calls.clear()
        signal.send(sender=sender_a)
        assert ("weak", "a") in calls
        del holder
        gc.collect()
        calls.clear()
        signal.send(sender=sender_a)
        assert calls == [("everyone", "a")]
    finally:
        signal.disconnect(everyone)
        signal.disconnect(only_b, sender=sender_b)


def test_worker_init_installs_unless_the_lean_path_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    was_installed = bool(speedups._original)
    speedups.uninstall()
    try:
        monkeypatch.setattr("taskyard.workers.speedups.lean_enabled", lambda app: False)
        speedups.on_worker_init(sender=SimpleNamespace(app=object()))
        assert not speedups._original
        monkeypatch.setattr("taskyard.workers.speedups.lean_enabled", lambda app: True)
        speedups.on_worker_init(sender=SimpleNamespace(app=object()))
        assert speedups._original
    finally:
        if not was_installed:
            speedups.uninstall()


def test_cached_utcoffset_is_celerys() -> None:
    from celery.utils.time import utcoffset as celery_utcoffset

    from taskyard.workers.speedups import utcoffset

    assert utcoffset() == celery_utcoffset()
    assert utcoffset() == utcoffset()
