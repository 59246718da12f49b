"""The example service's Celery app."""

from taskyard import create_app

app = create_app(
    "bdc",
    include=["examples.bdc.tasks", "examples.bdc.warmers"],
    maintenance={"metadata": "examples.bdc.models:Base.metadata"},
)
