"""Wiring, execution and resume."""
