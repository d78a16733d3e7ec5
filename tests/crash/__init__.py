"""Crash-injection harness for the trainers (see harness.py)."""
