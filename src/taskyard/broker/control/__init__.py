"""Fragments of the fetch script that decide what may be reserved (flow control)."""
