"""``taskyard users add|token|remove|list|role|password``: who may use the console, and how.

Passwords are read from standard input (prompted twice on a terminal, one line otherwise), so
they never appear in a shell's history or a process list. Every change is in the audit trail,
its actor the operating-system user who ran the command.
"""

from __future__ import annotations

import getpass
import sys
import time

import click

from taskyard.cli.loader import APP_OPTION, load_runtime
from taskyard.errors import UserError
from taskyard.monitoring.api.audit import AuditLog
from taskyard.monitoring.api.users import Role, UserStore
from taskyard.runtime import Runtime

ROLE_CHOICE = click.Choice(["viewer", "operator", "admin"], case_sensitive=False)


def _stores(runtime: Runtime) -> tuple[UserStore, AuditLog]:
    monitoring = runtime.settings.monitoring
    return (
        UserStore(runtime.redis, runtime.keys, monitoring.session_ttl_s),
        AuditLog(runtime.redis, runtime.keys, monitoring.audit_max_entries),
    )


def _audit(log: AuditLog, action: str, target: str, **detail: str) -> None:
    log.record(
        actor=f"cli:{getpass.getuser()}",
        role="admin",
        action=action,
        target=target,
        via="cli",
        detail=dict(detail),
    )


def _read_password() -> str:
    if sys.stdin.isatty():
        password: str = click.prompt("password", hide_input=True, confirmation_prompt=True)
        return password
    line = sys.stdin.readline()
    if not line:
        raise click.ClickException("no password on standard input")
    return line.rstrip("\r\n")


@click.group()
def users() -> None:
    """Users of the stats API and dashboard: viewer, operator or admin."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True, help="What the user may do.")
@APP_OPTION
def users_add(name: str, role: str, app_path: str | None) -> None:
    """Add a user; the password is read from standard input."""
    store, log = _stores(load_runtime(app_path))
    try:
        store.add(name, Role.parse(role), _read_password())
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(log, "user.add", name, role=role)
    click.echo(f"added {name!r} as {role}; from now on the API and dashboard need credentials")


@users.command("token")
@click.argument("name")
@click.option("--revoke", is_flag=True, help="Revoke every token of the user instead.")
@APP_OPTION
def users_token(name: str, revoke: bool, app_path: str | None) -> None:
    """Print a new API token for NAME (send it as 'Authorization: Bearer <token>')."""
    store, log = _stores(load_runtime(app_path))
    try:
        if revoke:
            count = store.revoke_tokens(name)
            _audit(log, "user.tokens_revoked", name, count=str(count))
            click.echo(f"revoked {count} token(s) of {name!r}")
            return
        token = store.issue_token(name)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(log, "user.token", name)
    click.echo(token)


@users.command("remove")
@click.argument("name")
@APP_OPTION
def users_remove(name: str, app_path: str | None) -> None:
    """Remove a user and every token of theirs."""
    store, log = _stores(load_runtime(app_path))
    try:
        store.remove(name)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(log, "user.remove", name)
    click.echo(f"removed {name!r}")


@users.command("role")
@click.argument("name")
@click.argument("role", type=ROLE_CHOICE)
@APP_OPTION
def users_role(name: str, role: str, app_path: str | None) -> None:
    """Change NAME's role (their open sessions take it at their next request)."""
    store, log = _stores(load_runtime(app_path))
    try:
        store.set_role(name, Role.parse(role))
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(log, "user.role", name, role=role)
    click.echo(f"{name!r} is now {role}")


@users.command("password")
@click.argument("name")
@APP_OPTION
def users_password(name: str, app_path: str | None) -> None:
    """Set NAME's password from standard input."""
    store, log = _stores(load_runtime(app_path))
    try:
        store.set_password(name, _read_password())
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    _audit(log, "user.password", name)
    click.echo(f"password of {name!r} changed")


@users.command("list")
@APP_OPTION
def users_list(app_path: str | None) -> None:
    """Every user, their role, when they were added and how many tokens they hold."""
    store, _ = _stores(load_runtime(app_path))
    rows = store.list()
    if not rows:
        click.echo("no users: the API and dashboard answer without credentials on loopback")
        return
    for user in rows:
        added = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(user.created))
        click.echo(f"{user.name:24} {user.role.label:9} added {added}  tokens {user.tokens}")
