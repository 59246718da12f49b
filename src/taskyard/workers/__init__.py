"""Worker profiles and resource guards."""

from taskyard.workers.profiles import WorkerProfile, celery_worker_argv, get_profile

__all__ = ["WorkerProfile", "celery_worker_argv", "get_profile"]
