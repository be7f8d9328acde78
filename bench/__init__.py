"""Benchmarks that print figures; they never fail on timing."""
