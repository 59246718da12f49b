"""taskyard batching."""
