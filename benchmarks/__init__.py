"""taskyard benchmarks: each compares taskyard with plain Celery in the same run."""
