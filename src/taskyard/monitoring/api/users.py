"""Users of the operator console: roles, hashed passwords, API tokens, browser sessions.

Three roles, each including the one before:

- ``viewer`` reads every page and route, with task arguments withheld;
- ``operator`` also sees arguments (per-task redaction still applies) and acts: replay dead
  letters, cancel tasks, pause and resume, change limits;
- ``admin`` also purges dead letters and manages users.

Users live in Redis (``keys.users``) so every API process and the ``taskyard users`` command
see the same ones. Passwords are stored as argon2id hashes; API tokens and session cookies
only as their SHA-256 (a leaked Redis dump gives neither). The configured admin token
(``TASKYARD_MONITORING__API_TOKEN``) keeps working as an admin named ``admin-token``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

import redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from taskyard.errors import UserError
from taskyard.keys import Keys
from taskyard.serialization import text


class Role(enum.IntEnum):
    """What a user may do; a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise UserError(
                f"unknown role {value!r}; roles: viewer, operator, admin", value=value
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(enum.Enum):
    """Everything the console distinguishes, with the least role that may do it (the name in
    each value keeps members distinct: an Enum merges members of equal value)."""

    READ = ("read", Role.VIEWER)
    VIEW_ARGUMENTS = ("view arguments", Role.OPERATOR)
    REPLAY = ("replay", Role.OPERATOR)
    CANCEL = ("cancel", Role.OPERATOR)
    PAUSE = ("pause", Role.OPERATOR)
    LIMITS = ("change limits", Role.OPERATOR)
    #: Cache invalidation, maintenance runs, requeued batches: the operator's other levers.
    OPERATE = ("operate", Role.OPERATOR)
    PURGE = ("purge", Role.ADMIN)
    MANAGE_USERS = ("manage users", Role.ADMIN)
    READ_AUDIT = ("read the audit trail", Role.ADMIN)

    @property
    def role(self) -> Role:
        return self.value[1]

    @property
    def label(self) -> str:
        return self.value[0]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user, or the configured admin token."""

    name: str
    role: Role
    #: "password", "token", "session" or "admin-token": how the request proved who it is.
    via: str
    #: The session's CSRF token (browser sessions only): forms must send it back.
    csrf: str | None = None

    def may(self, action: Action) -> bool:
        return self.role >= action.role


#: The principal of the configured admin token.
ADMIN_TOKEN_NAME = "admin-token"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
TOKEN_PREFIX = "tyu_"

_hasher = PasswordHasher()
#: Verified against when the user is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("taskyard-no-such-user")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UserError(
            f"user name {name!r} is not allowed: 1-64 characters, letters, digits and _ . @ -, "
            "starting with a letter or digit",
            value=name,
        )
    if name == ADMIN_TOKEN_NAME:
        raise UserError(f"user name {name!r} is reserved for the admin token", value=name)
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise UserError(
            f"a password needs {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters "
            f"(got {len(password)})"
        )
    return password


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    created: float
    tokens: int


class UserStore:
    """Users, their tokens and browser sessions in one Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, session_ttl_s: float = 12 * 3600.0):
        self.redis = client
        self.keys = keys
        self.session_ttl_s = session_ttl_s

    # --- users ---------------------------------------------------------------------------
    def any(self) -> bool:
        """Whether any user exists (then every route but health needs credentials)."""
        return bool(self.redis.hlen(self.keys.users()))

    def add(self, name: str, role: Role, password: str) -> User:
        """Create a user; an existing name is refused (remove it first)."""
        record = {
            "role": role.label,
            "hash": _hasher.hash(check_password(password)),
            "created": time.time(),
        }
        if not self.redis.hsetnx(self.keys.users(), check_name(name), json.dumps(record)):
            raise UserError(
                f"user {name!r} exists; `taskyard users remove {name}` first", value=name
            )
        return User(name, role, float(str(record["created"])), 0)

    def set_role(self, name: str, role: Role) -> None:
        record = self._record(name)
        record["role"] = role.label
        self.redis.hset(self.keys.users(), name, json.dumps(record))

    def set_password(self, name: str, password: str) -> None:
        record = self._record(name)
        record["hash"] = _hasher.hash(check_password(password))
        self.redis.hset(self.keys.users(), name, json.dumps(record))

    def remove(self, name: str) -> None:
        """Delete a user and every token of theirs (their sessions fail at the next request)."""
        self._record(name)
        tokens = [
            digest
            for digest, owner in self.redis.hgetall(self.keys.user_tokens()).items()
            if text(owner) == name
        ]
        pipe = self.redis.pipeline()
        pipe.hdel(self.keys.users(), name)
        if tokens:
            pipe.hdel(self.keys.user_tokens(), *tokens)
        pipe.execute()

    def list(self) -> list[User]:
        owners: dict[str, int] = {}
        for owner in self.redis.hvals(self.keys.user_tokens()):
            owners[text(owner)] = owners.get(text(owner), 0) + 1
        users = []
        for name, raw in sorted(self.redis.hgetall(self.keys.users()).items()):
            record = json.loads(raw)
            users.append(
                User(
                    text(name),
                    Role.parse(record["role"]),
                    record["created"],
                    owners.get(text(name), 0),
                )
            )
        return users

    def _record(self, name: str) -> dict[str, object]:
        raw = self.redis.hget(self.keys.users(), name)
        if raw is None:
            raise UserError(f"unknown user {name!r}", value=name)
        record: dict[str, object] = json.loads(raw)
        return record

    # --- proofs --------------------------------------------------------------------------
    def verify_password(self, name: str, password: str) -> Principal | None:
        """The user's principal when ``password`` is theirs, else None (in constant work)."""
        raw = self.redis.hget(self.keys.users(), name) if NAME_PATTERN.match(name) else None
        record = json.loads(raw) if raw is not None else None
        try:
            _hasher.verify(record["hash"] if record else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        if record is None:
            return None
        return Principal(name, Role.parse(record["role"]), "password")

    def issue_token(self, name: str) -> str:
        """A new API token for ``name`` (shown once; only its digest is kept)."""
        self._record(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.redis.hset(self.keys.user_tokens(), _digest(token), name)
        return token

    def revoke_tokens(self, name: str) -> int:
        digests = [
            d
            for d, owner in self.redis.hgetall(self.keys.user_tokens()).items()
            if text(owner) == name
        ]
        return int(self.redis.hdel(self.keys.user_tokens(), *digests)) if digests else 0

    def verify_token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        owner = self.redis.hget(self.keys.user_tokens(), _digest(token))
        if owner is None:
            return None
        raw = self.redis.hget(self.keys.users(), owner)
        if raw is None:
            return None
        return Principal(text(owner), Role.parse(json.loads(raw)["role"]), "token")

    # --- browser sessions ----------------------------------------------------------------
    def open_session(self, principal: Principal) -> tuple[str, str]:
        """(cookie value, CSRF token) of a new session for ``principal``."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        self.redis.set(
            self.keys.session(_digest(sid)),
            json.dumps({"user": principal.name, "csrf": csrf}),
            ex=max(1, int(self.session_ttl_s)),
        )
        return sid, csrf

    def session(self, sid: str) -> Principal | None:
        """The session's principal, its role read now (a demoted user is demoted at once)."""
        raw = self.redis.get(self.keys.session(_digest(sid)))
        if raw is None:
            return None
        state = json.loads(raw)
        record = self.redis.hget(self.keys.users(), state["user"])
        if record is None:
            return None
        role = Role.parse(json.loads(record)["role"])
        return Principal(state["user"], role, "session", csrf=state["csrf"])

    def close_session(self, sid: str) -> None:
        self.redis.delete(self.keys.session(_digest(sid)))


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )
