"""Helpers of `scripts/bench.py`: timing, the measured systems, the roofline and the report.

Every module imports its heavy dependencies (jax, torch, matplotlib) inside functions, so the
orchestrating process stays light and each system's subprocess loads only what it uses.
"""
