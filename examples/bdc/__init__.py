"""bdc: a beneficiary-management service, the first user of taskyard.

``celery -A examples.bdc worker`` and ``taskyard worker -A examples.bdc`` find ``app`` here.
"""

from examples.bdc.app import app

__all__ = ["app"]
