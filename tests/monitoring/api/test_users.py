"""Users, roles, tokens, sessions and the audit trail, on the suite's real Redis."""

from __future__ import annotations

import time

import pytest
import redis
from click.testing import CliRunner

from taskyard.cli import main
from taskyard.errors import UserError
from taskyard.keys import Keys
from taskyard.monitoring.api.audit import AuditLog
from taskyard.monitoring.api.users import Action, Role, UserStore
from tests import servers

PASSWORD = "correct horse battery"


@pytest.fixture
def store(redis_client: redis.Redis) -> UserStore:
    return UserStore(redis_client, Keys(), session_ttl_s=60)


def test_roles_include_the_ones_below() -> None:
    assert Role.ADMIN > Role.OPERATOR > Role.VIEWER
    allowed = {role: {a for a in Action if role >= a.role} for role in Role}
    assert allowed[Role.VIEWER] == {Action.READ}
    assert Action.REPLAY in allowed[Role.OPERATOR] and Action.PURGE not in allowed[Role.OPERATOR]
    assert allowed[Role.ADMIN] == set(Action)


def test_passwords_are_hashed_and_checked(store: UserStore, redis_client: redis.Redis) -> None:
    assert not store.any()
    store.add("ana", Role.OPERATOR, PASSWORD)
    assert store.any()
    stored = redis_client.hget(Keys().users(), "ana")
    assert stored is not None and PASSWORD.encode() not in stored and b"$argon2id$" in stored
    who = store.verify_password("ana", PASSWORD)
    assert who is not None and who.role is Role.OPERATOR and who.via == "password"
    assert store.verify_password("ana", PASSWORD + "x") is None
    assert store.verify_password("nobody", PASSWORD) is None
    assert store.verify_password("<script>", PASSWORD) is None


@pytest.mark.parametrize(
    ("name", "password", "match"),
    [
        ("", PASSWORD, "not allowed"),
        ("a b", PASSWORD, "not allowed"),
        ("x" * 65, PASSWORD, "not allowed"),
        ("\x1b[2J", PASSWORD, "not allowed"),
        ("admin-token", PASSWORD, "reserved"),
        ("bob", "short", "10 to 1024 characters"),
    ],
)
def test_bad_names_and_passwords_are_refused_by_name(
    store: UserStore, name: str, password: str, match: str
) -> None:
    with pytest.raises(UserError, match=match):
        store.add(name, Role.VIEWER, password)
    assert not store.any()


def test_a_name_is_added_once(store: UserStore) -> None:
    store.add("ana", Role.VIEWER, PASSWORD)
    with pytest.raises(UserError, match="exists"):
        store.add("ana", Role.ADMIN, PASSWORD)
    assert [u.role for u in store.list()] == [Role.VIEWER]


def test_tokens_are_kept_as_digests_and_die_with_their_user(
    store: UserStore, redis_client: redis.Redis
) -> None:
    store.add("ops", Role.OPERATOR, PASSWORD)
    token = store.issue_token("ops")
    assert token.encode() not in b"".join(redis_client.hkeys(Keys().user_tokens()))
    who = store.verify_token(token)
    assert who is not None and (who.name, who.role, who.via) == ("ops", Role.OPERATOR, "token")
    assert store.verify_token(token[:-1] + "x") is None
    assert store.verify_token("not-a-token") is None
    store.remove("ops")
    assert store.verify_token(token) is None
    assert redis_client.hlen(Keys().user_tokens()) == 0


def test_sessions_follow_the_users_role_and_expire(store: UserStore) -> None:
    store.add("vic", Role.VIEWER, PASSWORD)
    principal = store.verify_password("vic", PASSWORD)
    assert principal is not None
    sid, csrf = store.open_session(principal)
    seen = store.session(sid)
    assert seen is not None and seen.csrf == csrf and seen.role is Role.VIEWER
    store.set_role("vic", Role.ADMIN)
    seen = store.session(sid)
    assert seen is not None and seen.role is Role.ADMIN
    store.close_session(sid)
    assert store.session(sid) is None
    short = UserStore(store.redis, store.keys, session_ttl_s=1)
    sid, _ = short.open_session(principal)
    deadline = time.monotonic() + 10
    while short.session(sid) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert short.session(sid) is None


def test_audit_entries_read_back_newest_first_and_filtered(redis_client: redis.Redis) -> None:
    log = AuditLog(redis_client, Keys(), max_entries=1000)
    for i in range(1200):
        log.record(
            actor="ana" if i % 2 else "bob",
            role="operator",
            action="dead.replay",
            target=f"t{i}",
            count=i,
        )
    log.record(
        actor="ana",
        role="admin",
        action="dead.purge",
        target="all",
        count=7,
        detail={"filter": {"name": "x"}},
    )
    recent = log.recent(5)
    assert recent[0].action == "dead.purge" and recent[0].detail == {"filter": {"name": "x"}}
    assert [e.target for e in recent[1:]] == ["t1199", "t1198", "t1197", "t1196"]
    bobs = log.recent(600, actor="bob")
    assert all(e.actor == "bob" for e in bobs) and bobs[0].target == "t1198"
    assert redis_client.xlen(Keys().audit()) <= 1300  # capped (approximately)


def test_users_command_adds_lists_tokens_and_removes(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKYARD_REDIS_URL", servers.REDIS_URL)
    runner = CliRunner()
    added = runner.invoke(
        main, ["users", "add", "ana", "--role", "operator"], input=PASSWORD + "\n"
    )
    assert added.exit_code == 0, added.output
    listed = runner.invoke(main, ["users", "list"])
    assert "ana" in listed.output and "operator" in listed.output
    token = runner.invoke(main, ["users", "token", "ana"])
    assert token.exit_code == 0 and token.stdout.strip().startswith("tyu_")
    store = UserStore(redis_client, Keys())
    assert store.verify_token(token.stdout.strip()) is not None
    bad = runner.invoke(main, ["users", "add", "bob", "--role", "root"], input=PASSWORD + "\n")
    assert bad.exit_code == 2 and "'root' is not one of" in bad.output
    short = runner.invoke(main, ["users", "add", "bob", "--role", "viewer"], input="pw\n")
    assert short.exit_code == 2 and "10 to 1024 characters" in short.output
    removed = runner.invoke(main, ["users", "remove", "ana"])
    assert removed.exit_code == 0 and not store.any()
    actions = [e.action for e in AuditLog(redis_client, Keys()).recent(10)]
    assert actions == ["user.remove", "user.token", "user.add"]
