"""The stack file: where ``taskyard up`` (or ``taskyard flower``) runs, for every later command.

``taskyard up`` writes ``.taskyard-stack.json`` in its working directory (mode 0600: it holds
credentials) with the settings a second shell needs, as ``TASKYARD_*`` variables, and the
addresses of the API, dashboard and Flower. Every ``taskyard`` command started in that directory
fills each variable the environment leaves unset from the file (environment > stack file >
default), so ``taskyard stats show`` reads the embedded Redis of ``make run`` without an
``export``. A file whose process has ended is ignored, with one line saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import time
from collections.abc import Callable, Container, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: File name, in the working directory of the process that writes it (git-ignored).
STACK_FILE = ".taskyard-stack.json"
#: Layout version of the file; a reader refuses other versions rather than misread them.
VERSION = 1


@dataclass
class StackFile:
    """What one ``taskyard up`` (or a lone ``taskyard flower``) recorded about itself."""

    path: Path
    pid: int
    started_at: float
    #: Settings as ``TASKYARD_*`` variable -> value, exported to commands run in this directory.
    env: dict[str, str] = field(default_factory=dict)
    #: Human addresses: "api", "dashboard", "docs", "metrics", "flower".
    urls: dict[str, str] = field(default_factory=dict)
    app: str | None = None

    @property
    def alive(self) -> bool:
        """Whether the process that wrote the file still runs (not another one that got its
        pid later: that one started after the file was written)."""
        if not pid_alive(self.pid):
            return False
        import psutil

        try:
            return bool(psutil.Process(self.pid).create_time() <= self.started_at + 1.0)
        except psutil.Error:
            return False

    def as_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "pid": self.pid,
            "started_at": self.started_at,
            "app": self.app,
            "env": self.env,
            "urls": self.urls,
        }

    def export_lines(self, leave_out: Container[str] = ()) -> list[str]:
        """``export NAME=value`` lines for a POSIX shell, values quoted, without ``leave_out``
        (secrets the user configured: they are not echoed back)."""
        return [
            f"export {name}={shlex.quote(value)}"
            for name, value in sorted(self.env.items())
            if name not in leave_out
        ]


class StackFileError(ValueError):
    """The stack file exists but cannot be read as one."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts as ended)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/<pid>/stat field 3 is the state; Z is a zombie whose parent has not reaped it.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def stack_path(directory: Path | None = None) -> Path:
    """The stack file's path in ``directory`` (default: the working directory)."""
    return (directory or Path.cwd()) / STACK_FILE


def read(path: Path) -> StackFile | None:
    """The stack file at ``path``, or None when there is none.

    Raises:
        StackFileError: the file exists but is not a stack file of this version.
    """
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StackFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version') if isinstance(data, dict) else '?'}")
        env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
        urls = {str(k): str(v) for k, v in (data.get("urls") or {}).items()}
        return StackFile(
            path=path,
            pid=int(data["pid"]),
            started_at=float(data["started_at"]),
            env=env,
            urls=urls,
            app=data.get("app"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StackFileError(f"{path} is not a taskyard stack file ({exc}); delete it") from None


def write(stack: StackFile) -> None:
    """Write ``stack`` atomically, readable by its owner only (it holds credentials)."""
    # The temporary name is unpredictable and opened with O_EXCL | O_NOFOLLOW: a file or symlink
    # someone planted in a shared directory is never reused, truncated or followed, so the
    # secrets land only in a file this process created 0600. os.replace swaps the directory
    # entry, so a symlink planted at the stack file's own name is replaced, not written through.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = stack.path.with_name(f"{stack.path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "w") as sink:
            json.dump(stack.as_json(), sink, indent=2)
            sink.write("\n")
        os.replace(tmp, stack.path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_if_owned(path: Path, pid: int) -> None:
    """Delete the stack file at ``path`` if process ``pid`` wrote it (a newer stack keeps its)."""
    with contextlib.suppress(StackFileError, OSError):
        current = read(path)
        if current is not None and current.pid == pid:
            path.unlink()


def new(
    path: Path, env: Mapping[str, str], urls: Mapping[str, str], app: str | None = None
) -> StackFile:
    """A stack file for this process."""
    return StackFile(
        path=path, pid=os.getpid(), started_at=time.time(), env=dict(env), urls=dict(urls), app=app
    )


# --- resolution: environment > stack file > default ---------------------------------------------


@dataclass
class Resolution:
    """What the stack file contributed to this command's settings."""

    path: Path
    stack: StackFile | None = None
    #: Variables taken from the stack file (the environment left them unset).
    applied: list[str] = field(default_factory=list)
    #: Why a stack file present here was not used, if it was not.
    ignored: str | None = None


def apply(
    environ: MutableMapping[str, str],
    configured: Callable[[str], bool],
    directory: Path | None = None,
) -> Resolution:
    """Fill ``environ`` from the stack file in ``directory`` where ``configured(name)`` is false.

    ``configured`` says whether the environment itself sets a ``TASKYARD_*`` variable (the
    settings module answers that); ``environ`` is what later settings reads and child processes
    see (``os.environ``).
    """
    path = stack_path(directory)
    resolution = Resolution(path=path)
    try:
        stack = read(path)
    except StackFileError as exc:
        resolution.ignored = str(exc)
        return resolution
    if stack is None:
        return resolution
    if not stack.alive:
        resolution.ignored = (
            f"{path.name} is from a stack that has ended (pid {stack.pid}, "
            f"started {_clock(stack.started_at)})"
        )
        return resolution
    resolution.stack = stack
    for name, value in stack.env.items():
        if not configured(name):
            environ[name] = value
            resolution.applied.append(name)
    return resolution


def redis_line(redis_url: str, resolution: Resolution, redis_variable: str) -> str | None:
    """The one line saying which Redis a command reads, or None when the environment chose it."""
    if resolution.stack is not None and redis_variable in resolution.applied:
        return (
            f"taskyard: reading Redis {redis_url} from {resolution.path.name} (written by "
            f"pid {resolution.stack.pid}, started {_clock(resolution.stack.started_at)})"
        )
    if resolution.stack is not None and redis_variable not in resolution.stack.env:
        where = f"{resolution.path.name} names no Redis"
    elif resolution.ignored:
        where = f"ignoring {resolution.ignored}"
    elif resolution.stack is None:
        where = f"no {redis_variable}, no {resolution.path.name} here"
    else:
        return None  # the environment set it
    return f"taskyard: reading Redis {redis_url}, the default ({where})"


def no_data_line(redis_url: str, namespace: str, redis_variable: str) -> str:
    """The warning for a Redis that holds nothing of taskyard's."""
    return (
        f"taskyard: warning: Redis {redis_url} holds no taskyard data (namespace "
        f"{namespace!r}: no workers, stats, alerts or batches); if the stack runs elsewhere, "
        f"set {redis_variable} or run this in the directory of its `taskyard up`"
    )


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))
