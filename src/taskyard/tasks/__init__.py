"""taskyard tasks."""
