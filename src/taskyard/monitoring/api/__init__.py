"""The stats API over HTTP: endpoints, admin routes, /metrics, the dashboard (FastAPI)."""

from taskyard.monitoring.api.app import create_api

__all__ = ["create_api"]
