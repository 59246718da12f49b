"""Worker profiles and resource guards."""

from taskyard.workers.guards import Guard, Reading, guard_of
from taskyard.workers.profiles import WorkerProfile, celery_worker_argv, get_profile

__all__ = ["Guard", "Reading", "WorkerProfile", "celery_worker_argv", "get_profile", "guard_of"]
