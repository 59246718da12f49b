"""taskyard monitoring."""
