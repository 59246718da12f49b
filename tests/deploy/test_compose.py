"""docker-compose.yml, Dockerfile and .env.example: checked without a Docker engine."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from taskyard.cli import main
from taskyard.cli.stack import UP_PROFILES
from taskyard.config import ENV_PREFIX, NESTED_DELIMITER, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
#: The Compose Specification schema, copied into the repository (origin and licence in the
#: README beside it) so the check runs in a clean clone and never skips.
SCHEMA = Path(__file__).resolve().parent / "compose-spec.json"

APP_SERVICES = ["worker-critical", "worker-default", "worker-batch", "beat", "flower", "api"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f".env.example line without '=': {line!r}"
        values[name.strip()] = value.strip()
    return values


def test_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)


def test_schema_check_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    """The schema check above can fail: an unknown key or a wrong condition is caught."""
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "when_ready"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_the_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"redis", "postgres", *APP_SERVICES}


def test_redis_persists_append_only_and_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    redis = services["redis"]
    argv = command(redis)
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must live on a volume"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert "ping" in redis["healthcheck"]["test"]


def test_postgres_has_a_healthcheck_and_a_volume(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    env = env_example()
    for name in ("POSTGRES_USER", "POSTGRES_DB"):
        assert env[name]
    # The password comes from .env or the shell only; compose refuses to start without it.
    required = "${POSTGRES_PASSWORD:?"
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith(required)
    # Every app service gets a database URL naming the same user, password and database.
    for name in APP_SERVICES:
        url = services[name]["environment"]["TASKYARD_DATABASE_URL"]
        assert url.startswith("postgresql"), name
        assert required in url and "@postgres:5432/" in url, name
        assert "${POSTGRES_USER:-" + env["POSTGRES_USER"] + "}" in url, name
        assert url.endswith("/${POSTGRES_DB:-" + env["POSTGRES_DB"] + "}"), name


def test_env_example_holds_no_working_secret() -> None:
    env = env_example()
    for name in (
        "POSTGRES_PASSWORD",
        "TASKYARD_MONITORING__FLOWER_BASIC_AUTH",
        "TASKYARD_MONITORING__API_TOKEN",
    ):
        assert not env.get(name), f"{name} must be set in .env, not in .env.example"
    for name, value in env.items():
        # No URL with user:password@ either.
        assert "@" not in value, f"{name} carries credentials: {value!r}"


def test_published_ports_bind_to_loopback_unless_configured(
    services: dict[str, dict[str, Any]],
) -> None:
    published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
    assert set(published) == {"flower", "api"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("${TASKYARD_BIND:-127.0.0.1}:"), (name, port)


def test_one_worker_service_per_profile_scalable(services: dict[str, dict[str, Any]]) -> None:
    settings = Settings()
    for profile in UP_PROFILES:
        worker = services[f"worker-{profile}"]
        argv = command(worker)
        assert argv[:2] == ["taskyard", "worker"]
        assert argv[argv.index("--profile") + 1] == profile
        assert profile in settings.worker_profiles
        # --scale needs generated container names and no fixed host port.
        assert "container_name" not in worker
        assert "ports" not in worker
        assert worker.get("deploy", {}).get("replicas", 1) == 1
        assert worker["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}
    covered = {q for p in UP_PROFILES for q in settings.worker_profiles[p]}
    assert covered == {"critical", "high", "normal", "low", "batch"}


def test_exactly_one_beat(services: dict[str, dict[str, Any]]) -> None:
    beats = [name for name, svc in services.items() if "command" in svc and "beat" in command(svc)]
    assert beats == ["beat"]
    beat = services["beat"]
    assert beat["deploy"]["replicas"] == 1
    assert command(beat)[:3] == ["celery", "-A", "examples.bdc"]


def test_flower_and_api_run_taskyard_commands_with_auth(
    services: dict[str, dict[str, Any]],
) -> None:
    assert command(services["flower"])[:2] == ["taskyard", "flower"]
    assert command(services["api"])[:2] == ["taskyard", "api"]
    assert services["flower"]["environment"]["TASKYARD_MONITORING__FLOWER_HOST"] == "0.0.0.0"
    assert services["api"]["environment"]["TASKYARD_MONITORING__API_HOST"] == "0.0.0.0"
    assert services["flower"]["ports"] == ["${TASKYARD_BIND:-127.0.0.1}:5555:5555"]
    assert services["api"]["ports"] == ["${TASKYARD_BIND:-127.0.0.1}:8000:8000"]
    assert "/health/live" in " ".join(services["api"]["healthcheck"]["test"])
    # Flower refuses every route without credentials: its healthcheck takes a 401 as "up".
    check = " ".join(services["flower"]["healthcheck"]["test"])
    assert "/healthcheck" in check and "401" in check


def test_taskyard_commands_exist_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        argv = command(services[name])
        if argv[0] == "taskyard":
            assert argv[1] in main.commands, f"{name}: no `taskyard {argv[1]}` command"


def test_app_services_wait_for_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert "redis" in depends, name
        for dependency, spec in depends.items():
            assert spec["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], dependency
    for name in ("worker-critical", "worker-default", "worker-batch", "beat", "api"):
        assert "postgres" in services[name]["depends_on"], name


def test_settings_come_from_the_env_example(services: dict[str, dict[str, Any]]) -> None:
    for name in [*APP_SERVICES, "postgres"]:
        files = services[name]["env_file"]
        paths = [f["path"] if isinstance(f, dict) else f for f in files]
        assert paths[0] == ".env.example", name
        assert all(f.get("required", True) is False for f in files[1:] if isinstance(f, dict)), (
            "optional overrides only"
        )
        assert services[name]["image"] == "taskyard:latest" or name == "postgres"


def _field(model: type[BaseModel], parts: list[str]) -> bool:
    name = parts[0].lower()
    if name not in model.model_fields:
        return False
    if len(parts) == 1:
        return True
    annotation = model.model_fields[name].annotation
    return (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and _field(annotation, parts[1:])
    )


def test_env_example_names_real_settings_with_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_example()
    names = [n for n in env if n.startswith(ENV_PREFIX)]
    assert names
    for name in names:
        parts = name[len(ENV_PREFIX) :].split(NESTED_DELIMITER)
        assert _field(Settings, parts), f"{name} is not a taskyard setting (typo?)"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name in names:
        monkeypatch.setenv(name, env[name])
    settings = load_settings()
    assert settings.effective_broker_url == "redis://redis:6379/0"
    # No built-in password: Flower generates one at start when none is configured.
    assert not settings.monitoring.flower_basic_auth


def test_dockerfile_installs_the_project_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines()]
    first = next(line for line in lines if line and not line.startswith("#"))
    assert first.startswith("FROM python:3.11")
    assert "COPY src ./src" in text and "COPY examples ./examples" in text
    assert "pip install" in text
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".env" in ignored
