"""The ``taskyard`` command: one module per command group, one app loader (:mod:`.loader`)."""

from __future__ import annotations

import click

from taskyard.cli.api import api_command
from taskyard.cli.batches import batches
from taskyard.cli.cache import cache
from taskyard.cli.flower import flower
from taskyard.cli.maintenance import maintenance
from taskyard.cli.stack import up, worker
from taskyard.cli.stats import stats


@click.group()
@click.version_option(package_name="taskyard")
def main() -> None:
    """taskyard: Celery task orchestration with five priority levels."""


for command in (worker, up, flower, api_command, batches, cache, maintenance, stats):
    main.add_command(command)
