"""Example applications built on taskyard."""
