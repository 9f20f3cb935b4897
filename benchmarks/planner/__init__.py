"""Capacity planning: profile a model's step latencies, simulate a fleet, recommend a P:D split."""
